"""Where a report goes and in which format: the writer a file name asks for, and the fallback
folders that take a report its own folder cannot (so results are never lost to a storage fault).
Apart from the writers (`report`, `pdf_report`), which all share `write_report`'s signature."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from bcc_desk.lab_records import LabRecords
from bcc_desk.prediction import Prediction
from bcc_desk.report import ExtraColumns, write_csv, write_report
from bcc_desk.report_file import ReportError, locked_target
from bcc_desk.run_record import RunInfo

log = logging.getLogger("bcc_desk.report")


REPORT_SUFFIXES = (".xlsx", ".csv", ".pdf")


def writer_for(out: Path) -> Callable[..., Path]:
    """The writer of a report named `out`: Excel for .xlsx, CSV for .csv, the PDF for .pdf (all
    with `write_report`'s signature).  Raises ValueError for any other suffix: a file named
    r.pdf must never hold a workbook."""
    suffix = Path(out).suffix.lower()
    if suffix == ".pdf":
        from bcc_desk.pdf_report import write_pdf  # reportlab loads only for a PDF

        return write_pdf
    if suffix not in REPORT_SUFFIXES:
        raise ValueError(f"a report is .xlsx, .csv or .pdf, not {Path(out).name!r}")
    return write_csv if suffix == ".csv" else write_report


def write_somewhere(
    predictions: Sequence[Prediction],
    out: Path,
    run: RunInfo,
    *,
    extra_columns: ExtraColumns | None = None,
    lab: LabRecords | None = None,
) -> tuple[Path, str | None]:
    """Write the report (`writer_for` `out`'s suffix) where asked or, when that place cannot
    take it (no space left, read-only, the folder gone, permissions changed during the run), in
    the first fallback folder that can: the per-user data directory's `reports/`, then the temp
    folder.  Results are never lost to a storage fault.  Returns the path written and, when it is
    not `out` (a fallback folder, or beside `out` while Excel holds it), why (one line); raises
    ReportError only when no place could take it."""
    writer = writer_for(out)
    try:
        written = writer(predictions, out, run, extra_columns=extra_columns, lab=lab)
    except ReportError as exc:
        reason = str(exc)
    else:  # beside `out` when Excel holds it: not where a script looks either (exit code 3)
        if written == out:
            return written, None
        return written, f"{out} is {'open in another program' if locked_target(out) else 'in use and could not be replaced'}"
    stamp = datetime.now().strftime("%Y-%m-%d %H%M%S")
    name = f"{out.stem} ({Path(run.root).name or 'run'}, {stamp}){out.suffix}"
    for folder in fallback_folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            written = writer(predictions, folder / name, run, extra_columns=extra_columns, lab=lab)
        except (ReportError, OSError) as exc:
            log.debug("fallback %s did not work either: %s", folder, exc)
            continue
        return written, reason
    raise ReportError(f"{reason}; no fallback folder ({', '.join(map(str, fallback_folders()))}) could take it either")


def fallback_folders() -> list[Path]:
    """Where a report goes when its own folder cannot take it, in order."""
    from bcc_desk.paths import user_data_dir

    return [user_data_dir() / "reports", Path(tempfile.gettempdir()) / "bcc-reports"]
