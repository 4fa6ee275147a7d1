"""The Excel (and CSV) report a lab reads: Images / Slides / Run sheets.

Three promises matter more than looks, because the report is opened by people who did not
run the classifier and often while it is still being rewritten (the folder-watching daemon):

* **No formulas from data.**  File, slide and error names come from the outside world; a name
  such as ``=cmd.jpg`` or ``@SUM(A1).jpg`` must stay text.  Every text cell goes through
  `_put_text` (xlsx: forced string type, real text kept) or `csv_text` (CSV: OWASP apostrophe).
* **Never a half-written report.**  Everything is written to a temporary file beside the target
  and moved into place with `os.replace`; a failure removes the temporary file and leaves the
  previous report untouched.
* **Never lose a report to a locked target.**  When the target is open in Excel or LibreOffice
  (their owner/lock files sit beside it) or cannot be replaced, the report goes to a sibling
  ``<stem> (<YYYY-mm-dd HHMMSS>)<suffix>``, a warning says where, and the written path is
  returned, so callers compare it with the path they asked for.

``needs_review`` is written as a real boolean (TRUE/FALSE in Excel, ``TRUE``/``FALSE`` in CSV) so
that filters and pandas read it as one.  Probabilities are numbers 0..1 shown as percentages.
"""

from __future__ import annotations

import csv
import getpass
import logging
import math
import os
import shlex
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from bcc_desk.files import new_file_mode
from bcc_desk.prediction import Prediction
from bcc_desk.slides import SlideCount, all_slides, count_slides, natural_key

if TYPE_CHECKING:
    from bcc_desk.classifier import Classifier

log = logging.getLogger(__name__)

PERCENT = "0.0%"
DATETIME = "yyyy-mm-dd hh:mm:ss"
OOD_FORMAT = "0.000"
REVIEW_FILL = "FFF2CC"
ERROR_FILL = "F8CBAD"
TOTAL_ROW = "All slides"

_MAX_CELL_CHARS = 32767  # Excel refuses (reports corruption for) longer cell texts
_CSV_RISKY = ("=", "+", "-", "@", "\t", "\r")

REVIEW_COLUMNS = ("reviewer label", "reviewed by", "reviewed at")
"""The columns the desktop app's export adds to the Images sheet (beside the CLI's own); what
`bcc-train import-reviews` reads back."""

ExtraColumns = Mapping[str, Callable[[Prediction], object]]
"""Extra per-image columns (e.g. the GUI's reviewer label/by/at): header -> value of a row."""


class ReportError(Exception):
    """The report could not be written at all (folder missing or not writable)."""


@dataclass
class RunInfo:
    """What produced a report, so a reader months later can tell how to trust it."""

    software_version: str
    models: list[tuple[str, str]]
    """(name, sha256) of every model that contributed."""
    classes: list[str]
    """Class names in the model's output order: the order of the `p:` and `n:` columns."""
    review_threshold: float
    ood_check: str
    """"on", "off" or "partly" (some models carry no out-of-distribution statistics)."""
    tta: bool
    device: str
    started: datetime
    finished: datetime | None
    """None while the run is still going (the daemon rewrites its report as it goes)."""
    root: str
    host: str
    user: str
    command: str
    extra: dict[str, str] = field(default_factory=dict)
    """Front-end specific facts (daemon settings, GUI session...), listed last on the Run sheet."""
    slide_review_threshold: float | None = None
    """The cut-off for an image that agrees with its slide; None: the slide's consensus was off."""
    colour_check: str = "off"
    """"on", "off" or "partly", as `ood_check`, for the colour check (`bcc_desk.colour`)."""

    @classmethod
    def collect(
        cls,
        *,
        models: list[tuple[str, str]],
        classes: list[str],
        review_threshold: float,
        ood_check: str,
        tta: bool,
        device: str,
        root: str | Path,
        command: str | None = None,
        started: datetime | None = None,
        finished: datetime | None = None,
        extra: dict[str, str] | None = None,
        slide_review_threshold: float | None = None,
        colour_check: str = "off",
    ) -> RunInfo:
        """Fill in what the machine knows (host, user, version, command line, start time)."""
        from bcc_desk import __version__

        return cls(
            software_version=__version__,
            models=list(models),
            classes=list(classes),
            review_threshold=review_threshold,
            ood_check=ood_check,
            tta=tta,
            device=device,
            started=started or datetime.now().astimezone(),
            finished=finished,
            root=str(root),
            host=_safe(socket.gethostname),
            user=_safe(getpass.getuser),
            command=command if command is not None else shlex.join(sys.argv),
            extra=dict(extra or {}),
            slide_review_threshold=slide_review_threshold,
            colour_check=colour_check,
        )


def run_info(
    classifier: Classifier,
    *,
    root: str | Path,
    command: str,
    started: datetime | None = None,
    finished: datetime | None = None,
    extra: dict[str, str] | None = None,
) -> RunInfo:
    """The Run sheet's record, taken from the classifier that made the predictions: its models
    (names, sha256s), classes in output order, review threshold, out-of-distribution check, TTA
    and numerics.  The one place every front end (classify, watch, the app's export) gets it."""
    return RunInfo.collect(
        models=[(b.name, b.sha256) for b in classifier.bundles], classes=list(classifier.classes),
        review_threshold=classifier.review_threshold, ood_check=ood_check(classifier.bundles),
        tta=classifier.tta, device=classifier.device_label, root=root, command=command,
        started=started, finished=finished, extra=extra,
        slide_review_threshold=classifier.slide_review_threshold if classifier.slide_consensus else None,
        colour_check=_on_off(sum(b.meta.colour is not None for b in classifier.bundles), len(classifier.bundles)),
    )


def ood_check(bundles: Sequence) -> str:
    """The Run sheet's "out-of-distribution check" for these bundles: "on" when every one
    carries the check, "off" when none does, "partly" in between."""
    return _on_off(sum(b.meta.ood is not None for b in bundles), len(bundles))


def _on_off(having: int, of: int) -> str:
    return "on" if having == of else ("off" if having == 0 else "partly")


def _safe(get: Callable[[], str]) -> str:
    # getpass.getuser raises in containers without a passwd entry: a report is still wanted.
    try:
        return get() or "unknown"
    except (OSError, KeyError, ImportError):  # getpass's failures: no passwd entry, no pwd module
        return "unknown"


def IMAGE_COLUMNS(classes: Sequence[str]) -> list[str]:
    """The Images sheet / CSV header: the same names wherever a row is shown."""
    return [
        "file", "slide", "label", "confidence", "margin", "needs_review", "error",
        *(f"p: {c}" for c in classes),
        "model", "model_sha256", "classified_at",
        "review_reason", "ood_score", "colour_score",
    ]


def SLIDE_COLUMNS(classes: Sequence[str]) -> list[str]:
    """The Slides sheet header: count and share of each class sit side by side."""
    per_class = [h for c in classes for h in (f"n: {c}", f"%: {c}")]
    return ["slide", "images", "classified", *per_class, "flagged", "unreadable", "note"]


# ---------------------------------------------------------------------------------------------
# Public writers


def write_report(
    predictions: Sequence[Prediction],
    out: Path,
    run: RunInfo,
    *,
    extra_columns: ExtraColumns | None = None,
    fallback: Path | None = None,
) -> Path:
    """Write the xlsx report atomically; return the path actually written.

    The returned path differs from `out` exactly when `out` was open/locked and the report went
    to a sibling instead.  `fallback` names that sibling (a daemon passes the one it got last
    time, so an open workbook does not make it spawn a new file every few seconds); without it a
    timestamped sibling is made.  Raises `ReportError` when the folder cannot be written.
    """
    def write(tmp: Path) -> None:
        rows = _image_rows(predictions, run.classes, extra_columns)
        wb = Workbook()
        _images_sheet(wb.active, rows, run.classes, extra_columns)
        _slides_sheet(wb.create_sheet("Slides"), predictions, run.classes)
        _run_sheet(wb.create_sheet("Run"), predictions, run)
        _save(wb, tmp)

    return _atomic_write(Path(out), write, fallback)


def write_csv(
    predictions: Sequence[Prediction],
    out: Path,
    run: RunInfo,
    *,
    extra_columns: ExtraColumns | None = None,
    fallback: Path | None = None,
) -> Path:
    """Write the Images rows as UTF-8 CSV (with BOM, for Excel); same rules as `write_report`."""
    header = IMAGE_COLUMNS(run.classes) + list(extra_columns or {})
    def write(tmp: Path) -> None:
        rows = _image_rows(predictions, run.classes, extra_columns)
        with open(tmp, "w", encoding="utf-8-sig", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([_csv_value(h) for h in header])
            for row in rows:
                w.writerow([_csv_value(v) for v in row.values])

    return _atomic_write(Path(out), write, fallback)


def write_somewhere(
    predictions: Sequence[Prediction],
    out: Path,
    run: RunInfo,
    *,
    extra_columns: ExtraColumns | None = None,
    csv: bool | None = None,
) -> tuple[Path, str | None]:
    """Write the report (xlsx, or CSV for a .csv `out`) where asked or, when that place cannot
    take it (no space left, read-only, the folder gone, permissions changed during the run), in
    the first fallback folder that can: the per-user data directory's `reports/`, then the temp
    folder.  Results are never lost to a storage fault.  Returns the path written and, when it is
    not `out`'s folder, why (one line); raises ReportError only when no place could take it.
    `csv` None: CSV for a .csv `out`."""
    writer = write_csv if (Path(out).suffix.lower() == ".csv" if csv is None else csv) else write_report
    try:
        return writer(predictions, out, run, extra_columns=extra_columns), None
    except ReportError as exc:
        reason = str(exc)
    stamp = datetime.now().strftime("%Y-%m-%d %H%M%S")
    name = f"{out.stem} ({Path(run.root).name or 'run'}, {stamp}){out.suffix}"
    for folder in fallback_folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            written = writer(predictions, folder / name, run, extra_columns=extra_columns)
        except (ReportError, OSError) as exc:
            log.debug("fallback %s did not work either: %s", folder, exc)
            continue
        return written, reason
    raise ReportError(f"{reason}; no fallback folder ({', '.join(map(str, fallback_folders()))}) could take it either")


def fallback_folders() -> list[Path]:
    """Where a report goes when its own folder cannot take it, in order."""
    from bcc_desk.paths import user_data_dir

    return [user_data_dir() / "reports", Path(tempfile.gettempdir()) / "bcc-reports"]


def locked_target(out: Path) -> bool:
    """True when Excel or LibreOffice has `out` open (its owner/lock file sits beside it)."""
    return _lock_file(Path(out)) is not None


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass
class _Row:
    values: list[object]
    flagged: bool
    failed: bool


def _image_rows(
    predictions: Sequence[Prediction], classes: Sequence[str], extra: ExtraColumns | None
) -> list[_Row]:
    clash = set(extra or {}) & set(IMAGE_COLUMNS(classes))
    if clash:
        raise ValueError(f"extra columns clash with the report's own: {sorted(clash)}")
    ordered = sorted(predictions, key=lambda p: (natural_key(p.slide), natural_key(p.file)))
    rows = []
    for p in ordered:
        values: list[object] = [
            p.file, p.slide, p.label, _number(p.confidence), _number(p.margin),
            bool(p.needs_review), p.error,
            *(_number(p.probabilities.get(c)) for c in classes),
            p.model, p.model_sha256, _local(p.classified_at),
            p.review_reason, _number(p.ood_score), _number(p.colour_score),
        ]
        values += [get(p) for get in (extra or {}).values()]
        rows.append(_Row(values, flagged=bool(p.needs_review), failed=p.error is not None))
    return rows


def _number(x: object) -> float | None:
    # NaN/inf would make Excel call the whole file corrupt: an empty cell says "no value".
    if x is None:
        return None
    f = float(x)  # also turns numpy scalars into plain floats
    return f if math.isfinite(f) else None


def _local(t: datetime | None) -> datetime | None:
    """Local wall-clock time without tzinfo (Excel has no time zones), to the second."""
    if t is None:
        return None
    if t.tzinfo is not None:
        t = t.astimezone().replace(tzinfo=None)
    return t.replace(microsecond=0)


# ---------------------------------------------------------------------------------------------
# Sheets


_BOLD = Font(bold=True)


def _put_text(cell, value: str) -> None:
    """Store `value` as literal text: never a formula or error code, even if it starts with '='.

    Characters XML cannot hold are shown as \\xNN instead of failing the whole report.
    """
    value = ILLEGAL_CHARACTERS_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    if len(value) > _MAX_CELL_CHARS:
        value = value[: _MAX_CELL_CHARS - 1] + "…"
    cell.value = value
    cell.data_type = "s"


def _put(cell, value: object, number_format: str | None = None) -> None:
    """Write one value with the right type; all text goes through `_put_text`."""
    if value is None:
        return
    if isinstance(value, str):
        _put_text(cell, value)
        return
    if isinstance(value, bool):
        cell.value = value
        return
    if isinstance(value, datetime):
        cell.value = _local(value)
        cell.number_format = DATETIME
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return
        cell.value = value
        if number_format:
            cell.number_format = number_format
        return
    # Anything else (e.g. a reviewer object from the GUI) is shown as its text, safely.
    _put_text(cell, str(value))


def _header(ws: Worksheet, names: Sequence[str]) -> None:
    for col, name in enumerate(names, start=1):
        cell = ws.cell(row=1, column=col)
        _put_text(cell, name)
        cell.font = _BOLD
    ws.freeze_panes = "A2"


def _widths(ws: Worksheet, names: Sequence[str], values: Sequence[Sequence[object]], cap: int = 50) -> None:
    for col, name in enumerate(names, start=1):
        longest = len(name)
        for row in values:
            v = row[col - 1]
            if isinstance(v, str):
                longest = max(longest, len(v))
            elif isinstance(v, datetime):
                longest = max(longest, 19)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                longest = max(longest, 7)
        ws.column_dimensions[get_column_letter(col)].width = min(longest + 2, cap)


def _images_sheet(
    ws: Worksheet, rows: list[_Row], classes: Sequence[str], extra: ExtraColumns | None
) -> None:
    ws.title = "Images"
    names = IMAGE_COLUMNS(classes) + list(extra or {})
    formats = {n: PERCENT for n in names if n in ("confidence", "margin") or n.startswith("p: ")}
    formats["ood_score"] = formats["colour_score"] = OOD_FORMAT
    _header(ws, names)
    review = PatternFill("solid", start_color=REVIEW_FILL, end_color=REVIEW_FILL)
    failed = PatternFill("solid", start_color=ERROR_FILL, end_color=ERROR_FILL)
    for r, row in enumerate(rows, start=2):
        fill = failed if row.failed else review if row.flagged else None
        for c, (name, value) in enumerate(zip(names, row.values), start=1):
            cell = ws.cell(row=r, column=c)
            _put(cell, value, formats.get(name))
            if fill is not None:
                cell.fill = fill
    ws.auto_filter.ref = f"A1:{get_column_letter(len(names))}{len(rows) + 1}"
    _widths(ws, names, [row.values for row in rows])


def _slide_row(name: str, count: SlideCount, classes: Sequence[str]) -> list[object]:
    per_class: list[object] = []
    for c in classes:
        per_class += [count.per_class.get(c, 0), count.share(c)]
    return [name, count.images, count.classified, *per_class, count.flagged, count.unreadable, count.note]


def _slides_sheet(ws: Worksheet, predictions: Sequence[Prediction], classes: Sequence[str]) -> None:
    names = SLIDE_COLUMNS(classes)
    formats = {n: PERCENT for n in names if n.startswith("%: ")}
    slides = count_slides(predictions)  # the model's labels: the app adds reviews as columns
    _header(ws, names)
    rows = [_slide_row(name, count, classes) for name, count in slides.items()]
    rows.append(_slide_row(TOTAL_ROW, all_slides(slides), classes))
    for r, values in enumerate(rows, start=2):
        for c, (name, value) in enumerate(zip(names, values), start=1):
            _put(ws.cell(row=r, column=c), value, formats.get(name))
    for cell in ws[len(rows) + 1]:
        cell.font = _BOLD
    ws.auto_filter.ref = f"A1:{get_column_letter(len(names))}{len(rows)}"  # total row stays out
    _widths(ws, names, rows)


def _run_sheet(ws: Worksheet, predictions: Sequence[Prediction], run: RunInfo) -> None:
    ok = [p for p in predictions if p.error is None]
    fields: list[tuple[str, object, str | None]] = [("software version", run.software_version, None)]
    for i, (name, sha) in enumerate(run.models, start=1):
        tag = "model" if len(run.models) == 1 else f"model {i}"
        fields += [(tag, name, None), (f"{tag} sha256", sha, None)]
    fields += [
        ("classes", "; ".join(run.classes), None),
        ("review threshold", _number(run.review_threshold), PERCENT),
        ("slide consensus", "off: every image judged alone" if run.slide_review_threshold is None else
         "on: an image whose label differs from most of its slide's is flagged", None),
        ("review threshold, agreeing with its slide", _number(run.slide_review_threshold), PERCENT),
        ("out-of-distribution check", run.ood_check, None),
        ("colour check", run.colour_check, None),
        ("test-time augmentation", "on" if run.tta else "off", None),
        ("device", run.device, None),
        ("started", run.started, None),
        ("finished", run.finished if run.finished is not None else "still running", None),
        ("duration", _duration(run.started, run.finished), None),
        ("root", run.root, None),
        ("host", run.host, None),
        ("user", run.user, None),
        ("command", run.command, None),
        ("images", len(predictions), None),
        ("classified", len(ok), None),
        ("flagged", sum(1 for p in predictions if p.needs_review), None),
        ("unreadable", len(predictions) - len(ok), None),
        ("report written", datetime.now(), None),
    ]
    fields += [(k, v, None) for k, v in run.extra.items()]
    _header(ws, ["field", "value"])
    for r, (name, value, fmt) in enumerate(fields, start=2):
        _put_text(ws.cell(row=r, column=1), name)
        _put(ws.cell(row=r, column=2), value, fmt)
    ws.column_dimensions["A"].width = max(len(f[0]) for f in fields) + 2
    ws.column_dimensions["B"].width = min(max(len(str(f[1])) for f in fields) + 2, 80)


def _duration(started: datetime, finished: datetime | None) -> str:
    if finished is None:
        return "still running"
    seconds = round((finished - started).total_seconds())
    return str(timedelta(seconds=max(seconds, 0)))


# ---------------------------------------------------------------------------------------------
# CSV cells


def _csv_value(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, datetime):
        return _local(v).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return v
    return csv_text(str(v))


def csv_text(s: str) -> str:
    """OWASP CSV-injection advice: a leading apostrophe keeps spreadsheet apps from evaluating."""
    return "'" + s if s.startswith(_CSV_RISKY) else s


def csv_plain(s: str) -> str:
    """The text `csv_text` was given (for CSV files this package reads back)."""
    return s[1:] if s.startswith("'") and s[1:].startswith(_CSV_RISKY) else s


# ---------------------------------------------------------------------------------------------
# Atomic save, lock files


def _save(wb: Workbook, path: Path) -> None:
    """`wb.save`, with the zip file closed on every path: openpyxl leaves it open when a write
    fails (a full disk), and its finaliser then prints a traceback from the garbage collector."""
    from zipfile import ZIP_DEFLATED, ZipFile

    from openpyxl.writer.excel import ExcelWriter

    wb.properties.modified = datetime.now(UTC).replace(tzinfo=None)  # as openpyxl's own save
    with ZipFile(path, "w", ZIP_DEFLATED, allowZip64=True) as archive:
        ExcelWriter(wb, archive).write_data()


def _lock_file(out: Path) -> Path | None:
    """The Office owner file (`~$...`) or LibreOffice lock (`.~lock.<name>#`) beside `out`."""
    name = out.name
    candidates = [f"~${name}", f".~lock.{name}#"]
    # Word-style owner files drop the first one or two characters of longer names; sources
    # disagree on Excel's rule, and a false alarm only costs a sibling file while a missed lock
    # lets Excel's next save overwrite the new report, so every form counts.
    if len(out.stem) > 2:
        candidates += [f"~${name[1:]}", f"~${name[2:]}"]
    for c in candidates:
        lock = out.with_name(c)
        if lock.is_file():
            return lock
    return None


def _sibling(out: Path) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d %H%M%S")
    return out.with_name(f"{out.stem} ({stamp}){out.suffix}")


def _diversion(out: Path, fallback: Path | None) -> Path:
    if fallback is not None:
        fallback = Path(fallback)
        if fallback != out and fallback.parent == out.parent and _lock_file(fallback) is None:
            return fallback
    return _sibling(out)


def _atomic_write(out: Path, write: Callable[[Path], None], fallback: Path | None) -> Path:
    """Run `write` on a temp file beside `out`, then move it into place (or beside, if locked)."""
    folder = out.parent
    if not folder.is_dir():
        raise ReportError(f"cannot write the report: folder {folder} does not exist")
    dest = out
    lock = _lock_file(out)
    if lock is not None:
        dest = _diversion(out, fallback)
    try:
        with tempfile.NamedTemporaryFile(
            dir=folder, prefix=f".{out.stem}.", suffix=out.suffix, delete=False
        ) as fh:
            tmp = Path(fh.name)
    except OSError as e:
        raise ReportError(f"cannot write the report in folder {folder}: {e.strerror or e}") from e
    try:
        try:
            write(tmp)
        except OSError as e:  # no space left, the folder removed or made read-only meanwhile
            raise ReportError(f"cannot write the report {out}: {e.strerror or e}") from e
        mode = new_file_mode(dest)
        if mode is not None:
            os.chmod(tmp, mode)
        try:
            os.replace(tmp, dest)
        except OSError as e:
            if dest != out:
                raise ReportError(f"cannot write the report {dest}: {e.strerror or e}") from e
            dest = _diversion(out, fallback)
            try:
                os.replace(tmp, dest)
            except OSError as e2:
                raise ReportError(f"cannot write the report {dest}: {e2.strerror or e2}") from e2
            log.warning(
                "report target %s could not be replaced (%s, open in another program?); "
                "wrote the report to %s instead", out, e.strerror or e, dest,
            )
        else:
            if lock is not None:
                log.warning(
                    "report target %s is open in another program (lock file %s); "
                    "wrote the report to %s instead", out, lock.name, dest,
                )
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return dest
