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
  returned, so callers compare it with the path they asked for.  Both live in `report_file`;
  what produced the report (the Run sheet's record) in `run_record`.

``needs_review`` is written as a real boolean (TRUE/FALSE in Excel, ``TRUE``/``FALSE`` in CSV) so
that filters and pandas read it as one.  Probabilities are numbers 0..1 shown as percentages.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import SupportsFloat

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from bcc_desk.lab_records import IDENTITY_HEADINGS, LabRecords
from bcc_desk.prediction import Prediction
from bcc_desk.report_file import atomic_report_write
from bcc_desk.run_record import RunInfo
from bcc_desk.safe_text import csv_text
from bcc_desk.slides import SlideCount, all_slides, count_slides, natural_key
from bcc_desk.verdict import DECISION_AID, slide_verdict

PERCENT = "0.0%"
DATETIME = "yyyy-mm-dd hh:mm:ss"
OOD_FORMAT = "0.000"
REVIEW_FILL = "FFF2CC"
ERROR_FILL = "F8CBAD"
TOTAL_ROW = "All slides"

_MAX_CELL_CHARS = 32767  # Excel refuses (reports corruption for) longer cell texts

REVIEW_COLUMNS = ("reviewer label", "reviewed by", "reviewed at")
"""The columns the desktop app's export adds to the Images sheet (beside the CLI's own); what
`bcc-train import-reviews` reads back."""

ExtraColumns = Mapping[str, Callable[[Prediction], object]]
"""Extra per-image columns (e.g. the GUI's reviewer label/by/at): header -> value of a row."""


def IMAGE_COLUMNS(classes: Sequence[str]) -> list[str]:
    """The Images sheet / CSV header: the same names wherever a row is shown.  In a reader's
    order: where, what, must a person look and why; then the numbers; the audit trail last."""
    return [
        "file", "slide", "patient_id", "label", "confidence", "needs_review", "review_reason", "error",
        *(f"p: {c}" for c in classes),
        "margin", "ood_score", "colour_score",
        "model", "model_sha256", "classified_at",
    ]


SIGNATURE_COLUMNS = ("signed by", "signed at")


def SLIDE_COLUMNS(classes: Sequence[str]) -> list[str]:
    """The Slides sheet header: the slide and whose it is, its verdict, then count and share of
    each class side by side, then the sign-off."""
    per_class = [h for c in classes for h in (f"n: {c}", f"%: {c}")]
    return ["slide", *IDENTITY_HEADINGS, "verdict", "to review", "images", "classified", *per_class,
            "flagged", "unreadable", "note", *SIGNATURE_COLUMNS]


# ---------------------------------------------------------------------------------------------
# Public writers


def write_report(
    predictions: Sequence[Prediction],
    out: Path,
    run: RunInfo,
    *,
    extra_columns: ExtraColumns | None = None,
    lab: LabRecords | None = None,
    fallback: Path | None = None,
) -> Path:
    """Write the xlsx report atomically; return the path actually written.  `lab`: the slides'
    identities, reviewers' labels and sign-offs (none without it).

    The returned path differs from `out` exactly when `out` was open/locked and the report went
    to a sibling instead.  `fallback` names that sibling (a daemon passes the one it got last
    time, so an open workbook does not make it spawn a new file every few seconds); without it a
    timestamped sibling is made.  Raises `ReportError` when the folder cannot be written.
    """
    lab = lab or LabRecords()

    def write(tmp: Path) -> None:
        rows = _image_rows(predictions, run.classes, extra_columns, lab)
        wb = Workbook()
        _images_sheet(wb.active, rows, run.classes, extra_columns)
        _slides_sheet(wb.create_sheet("Slides"), predictions, run.classes, lab)
        _run_sheet(wb.create_sheet("Run"), predictions, run, lab)
        if run.not_classified:
            _not_classified_sheet(wb.create_sheet(NOT_CLASSIFIED_SHEET), run.not_classified)
        for ws in wb.worksheets:
            _print_setup(ws, run)
        _save(wb, tmp)

    return atomic_report_write(Path(out), write, fallback)


def write_csv(
    predictions: Sequence[Prediction],
    out: Path,
    run: RunInfo,
    *,
    extra_columns: ExtraColumns | None = None,
    lab: LabRecords | None = None,
    fallback: Path | None = None,
) -> Path:
    """Write the Images rows as UTF-8 CSV (with BOM, for Excel); same rules as `write_report`."""
    header = IMAGE_COLUMNS(run.classes) + list(extra_columns or {})

    def write(tmp: Path) -> None:
        rows = _image_rows(predictions, run.classes, extra_columns, lab or LabRecords())
        with open(tmp, "w", encoding="utf-8-sig", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([_csv_value(h) for h in header])
            for row in rows:
                w.writerow([_csv_value(v) for v in row.values])

    return atomic_report_write(Path(out), write, fallback)


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass
class _Row:
    values: list[object]
    flagged: bool
    failed: bool


def _image_rows(
    predictions: Sequence[Prediction], classes: Sequence[str], extra: ExtraColumns | None, lab: LabRecords
) -> list[_Row]:
    clash = set(extra or {}) & set(IMAGE_COLUMNS(classes))
    if clash:
        raise ValueError(f"extra columns clash with the report's own: {sorted(clash)}")
    ordered = sorted(predictions, key=lambda p: (natural_key(p.slide), natural_key(p.file)))
    rows = []
    for p in ordered:
        values: list[object] = [
            p.file, p.slide, lab.identity(p.slide).patient_id or None, p.label, _number(p.confidence),
            bool(p.needs_review), p.review_reason, p.error,
            *(_number(p.probabilities.get(c)) for c in classes),
            _number(p.margin), _number(p.ood_score), _number(p.colour_score),
            p.model, p.model_sha256, _local(p.classified_at),
        ]
        values += [get(p) for get in (extra or {}).values()]
        rows.append(_Row(values, flagged=bool(p.needs_review), failed=p.error is not None))
    return rows


def _number(x: SupportsFloat | None) -> float | None:
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


_HEADER_ALIGNMENT = Alignment(wrap_text=True, vertical="top")


def _header(ws: Worksheet, names: Sequence[str]) -> None:
    for col, name in enumerate(names, start=1):
        cell = ws.cell(row=1, column=col)
        _put_text(cell, name)
        cell.font = _BOLD
        cell.alignment = _HEADER_ALIGNMENT  # "n: early Pre-B" over two lines: a column as narrow as its numbers
    ws.freeze_panes = "A2"


def _widths(ws: Worksheet, names: Sequence[str], values: Sequence[Sequence[object]], cap: int = 50,
            caps: Mapping[str, int] | None = None) -> None:
    """Columns as wide as their longest value or the longest word of their header (which wraps),
    up to `cap` (`caps`: per column name): narrow columns are what lets a sheet print one page
    wide at a size people can read."""
    wrapped = False
    for col, name in enumerate(names, start=1):
        longest = max(len(word) for word in name.split())
        wrapped |= longest < len(name)
        for row in values:
            v = row[col - 1]
            if isinstance(v, str):
                longest = max(longest, len(v))
            elif isinstance(v, datetime):
                longest = max(longest, 19)
            elif isinstance(v, bool):
                longest = max(longest, 5)
            elif isinstance(v, (int, float)):
                longest = max(longest, 6)
        ws.column_dimensions[get_column_letter(col)].width = min(longest + 2, (caps or {}).get(name, cap))
    if wrapped:
        ws.row_dimensions[1].height = 30  # two lines: Excel does not grow a row for wrapped text by itself


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
    # The audit columns are for a machine: on paper their first characters are enough.
    _widths(ws, names, [row.values for row in rows], cap=36,
            caps={"review_reason": 28, "model_sha256": 12, "model": 16, "error": 24})  # long text runs on into the empty cell beside


def _slide_row(name: str, count: SlideCount, classes: Sequence[str], lab: LabRecords) -> list[object]:
    per_class: list[object] = []
    for c in classes:
        per_class += [count.per_class.get(c, 0), count.share(c)]
    verdict = slide_verdict(count)
    signed = lab.signatures.get(name)
    return [name, *(v or None for _, v in lab.identity(name).items()), verdict.call, "; ".join(verdict.to_review) or None,
            count.images, count.classified, *per_class, count.flagged, count.unreadable, count.note or None,
            signed.by if signed else None, signed.at if signed else None]


def _total_row(slides: Mapping[str, SlideCount], classes: Sequence[str], lab: LabRecords) -> list[object]:
    total = all_slides(slides)
    per_class: list[object] = []
    for c in classes:
        per_class += [total.per_class.get(c, 0), total.share(c)]
    signed = sum(1 for name in slides if name in lab.signatures)
    return [TOTAL_ROW, *[None] * len(IDENTITY_HEADINGS), None, None, total.images, total.classified, *per_class,
            total.flagged, total.unreadable, None, f"{signed} of {len(slides)} signed", None]


def _slides_sheet(ws: Worksheet, predictions: Sequence[Prediction], classes: Sequence[str], lab: LabRecords) -> None:
    names = SLIDE_COLUMNS(classes)
    formats = {n: PERCENT for n in names if n.startswith("%: ")}
    slides = count_slides(predictions, lab.reviewed)  # a reviewed image counts as its reviewer labelled it
    _header(ws, names)
    rows = [_slide_row(name, count, classes, lab) for name, count in slides.items()]
    rows.append(_total_row(slides, classes, lab))
    for r, values in enumerate(rows, start=2):
        for c, (name, value) in enumerate(zip(names, values), start=1):
            _put(ws.cell(row=r, column=c), value, formats.get(name))
    for cell in ws[len(rows) + 1]:
        cell.font = _BOLD
    _put_text(ws.cell(row=len(rows) + 3, column=1), DECISION_AID)  # below the table, on paper too
    ws.cell(row=len(rows) + 3, column=1).font = Font(italic=True)
    ws.auto_filter.ref = f"A1:{get_column_letter(len(names))}{len(rows)}"  # total row stays out
    _widths(ws, names, rows, cap=30, caps={"verdict": 34, "to review": 26, "lab note": 20, "note": 24})
    wrap = Alignment(wrap_text=True, vertical="top")
    wrapped = [names.index(n) for n in ("verdict", "to review", "note")]  # what a reader must read whole
    for r, values in enumerate(rows, start=2):
        lines = 1
        for c in wrapped:
            ws.cell(row=r, column=c + 1).alignment = wrap
            width = ws.column_dimensions[get_column_letter(c + 1)].width - 1
            lines = max(lines, math.ceil(len(str(values[c] or "")) / width))
        if lines > 1:  # neither Excel nor LibreOffice grows a row for wrapped text when it opens the file
            ws.row_dimensions[r].height = 15 * lines


def _run_sheet(ws: Worksheet, predictions: Sequence[Prediction], run: RunInfo, lab: LabRecords) -> None:
    ok = [p for p in predictions if p.error is None]
    slides = {p.slide for p in predictions}
    fields: list[tuple[str, object, str | None]] = [("software version", run.software_version, None)]
    for i, (name, sha) in enumerate(run.models, start=1):
        tag = "model" if len(run.models) == 1 else f"model {i}"
        fields += [(tag, name, None), (f"{tag} sha256", sha, None)]
    fields += [
        ("model verdict", run.model_verdict, None),
        ("classes", "; ".join(run.classes), None),
        ("review threshold", _number(run.review_threshold), PERCENT),
        ("slide consensus", "off: every image judged alone" if run.slide_review_threshold is None else
         "on: an image whose label differs from most of its slide's is flagged", None),
        ("review threshold, agreeing with its slide", _number(run.slide_review_threshold), PERCENT),
        ("out-of-distribution check", run.ood_check, None),
        ("colour check", run.colour_check, None),
        ("test-time augmentation", "on" if run.tta else "off", None),
        ("device", run.device, None),
        ("run", _outcome(run, len(predictions)), None),
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
        ("not classified", len(run.not_classified), None),
        ("slides", len(slides), None),
        ("signed slides", sum(1 for s in slides if s in lab.signatures), None),
        ("verdicts", DECISION_AID, None),
        ("report written", datetime.now(), None),
    ]
    fields += [(k, v, None) for k, v in run.extra.items()]
    _header(ws, ["field", "value"])
    for r, (name, value, fmt) in enumerate(fields, start=2):
        _put_text(ws.cell(row=r, column=1), name)
        _put(ws.cell(row=r, column=2), value, fmt)
    ws.column_dimensions["A"].width = max(len(f[0]) for f in fields) + 2
    ws.column_dimensions["B"].width = min(max(len(str(f[1])) for f in fields) + 2, 80)
    for row in ws.iter_rows(min_row=2, min_col=2, max_col=2):  # a long command wraps in its cell: one page
        row[0].alignment = Alignment(wrap_text=True, vertical="top")


NOT_CLASSIFIED_SHEET = "Not classified"
UNVALIDATED_WARNING = "MODEL NOT VALIDATED: its trainer did not find it fit for use (see the Run sheet)"


def _outcome(run: RunInfo, done: int) -> str:
    if run.not_classified:
        return f"interrupted after {done} of {done + len(run.not_classified)} images: the rest are on the sheet {NOT_CLASSIFIED_SHEET!r}"
    return run.outcome


def _not_classified_sheet(ws: Worksheet, files: Sequence[str]) -> None:
    """The images an interrupted run never reached: nobody may take them for classified."""
    names = ["file", "slide"]
    rows = [[f, f.rpartition("/")[0] or "."] for f in sorted(files, key=natural_key)]
    _header(ws, names)
    for r, values in enumerate(rows, start=2):
        for c, value in enumerate(values, start=1):
            _put_text(ws.cell(row=r, column=c), value)
    _widths(ws, names, rows)


def _print_setup(ws: Worksheet, run: RunInfo) -> None:
    """Every sheet prints readably: A4 landscape, one page wide (the Run sheet one page in all),
    the header row on every page, and a footer naming the report, page X of Y, model and date."""
    ws.page_setup.orientation = ws.ORIENTATION_LANDSCAPE
    ws.page_setup.paperSize = ws.PAPERSIZE_A4
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 1 if ws.title == "Run" else 0  # 0: as many pages tall as it takes
    ws.print_options.gridLines = True
    ws.page_margins.left = ws.page_margins.right = 0.4
    if ws.title != "Run":
        ws.print_title_rows = "1:1"
    models = ", ".join(name for name, _ in run.models) or "no model"
    ws.oddFooter.left.text = "&F: &A"  # the file's own name (right even when written beside a locked one), sheet
    ws.oddFooter.center.text = "page &P of &N"
    ws.oddFooter.right.text = _footer_text(f"{models}, {run.started.astimezone():%Y-%m-%d %H:%M}")
    ws.oddFooter.left.size = ws.oddFooter.center.size = ws.oddFooter.right.size = 8
    if ws.title == "Slides":
        ws.oddHeader.center.text = _footer_text(DECISION_AID)
    if run.unvalidated:  # on every printed page: nobody may read these labels as a validated model's
        ws.oddHeader.left.text = UNVALIDATED_WARNING
        ws.oddHeader.left.color = "B00020"


def _footer_text(s: str, limit: int = 100) -> str:
    # '&' starts a code in Excel's header/footer language; text from a model's name stays text.
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("&", "&&")


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
        return (_local(v) or v).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return v
    return csv_text(str(v))


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
