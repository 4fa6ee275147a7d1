"""The PDF report a lab signs: one section per slide (its identity, verdict, counts, every flagged
field's thumbnail, unreadable images, sign-off), the model and software on every page.

Written with reportlab rather than Qt or matplotlib: the core has no Qt, so the CLI and the
folder-watching daemon can write it as well as the app (Qt's QPdfWriter would tie it to gui/);
platypus flows tables and image grids over as many pages as a slide needs, which matplotlib's
PdfPages (one figure per page, no text flow) does not.  Built-in Helvetica keeps the file small
and needs no font on disk; glyphs it lacks (CJK) print as boxes, never as an error.

Text from outside (file, slide, patient, reviewer, model and lab names) goes into Paragraphs only
through `pdf_text`, so a slide named ``<b>x</b>`` prints as those characters.  Header and footer
are drawn straight on the canvas, which never parses markup, so they take the raw text.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from reportlab.graphics.shapes import Drawing, Rect
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.utils import ImageReader, simpleSplit
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus.doctemplate import BaseDocTemplate, NextPageTemplate, PageTemplate
from reportlab.platypus.flowables import Flowable, KeepTogether, PageBreak, Spacer
from reportlab.platypus.frames import Frame
from reportlab.platypus.paragraph import Paragraph
from reportlab.platypus.tables import Table, TableStyle

from bcc_desk.images import ImageReadError, open_image
from bcc_desk.lab_records import LabRecords
from bcc_desk.prediction import Prediction
from bcc_desk.report import UNVALIDATED_WARNING, ExtraColumns, _local
from bcc_desk.report_file import atomic_report_write
from bcc_desk.run_record import RunInfo
from bcc_desk.safe_text import pdf_text
from bcc_desk.slides import SlideCount, count_slides, natural_key
from bcc_desk.verdict import DECISION_AID, slide_verdict

PAGE_W, PAGE_H = A4
MARGIN = 40
HEADER_H, FOOTER_H = 92, 62
WIDTH = PAGE_W - 2 * MARGIN
PER_ROW = 4
THUMB = 110
"""Thumbnail box in points; the pixels are twice that, so a print stays sharp."""
NONE = "\u2014"  # an em dash for an empty identity field (WinAnsi has it)

_ss = getSampleStyleSheet()
_BODY = ParagraphStyle("body", parent=_ss["Normal"], fontSize=9, leading=11)
_SMALL = ParagraphStyle("small", parent=_BODY, fontSize=7, leading=8.5)
_CELL = ParagraphStyle("cell", parent=_SMALL, alignment=1)
_CALL = ParagraphStyle("call", parent=_BODY, fontName="Helvetica-Bold", fontSize=13, leading=16, spaceAfter=3)
_WARN = ParagraphStyle("warn", parent=_BODY, textColor=colors.HexColor("#9c4a00"), spaceAfter=2)
_H2 = ParagraphStyle("h2", parent=_BODY, fontName="Helvetica-Bold", fontSize=10.5, leading=13, spaceBefore=10, spaceAfter=4)
_GRID = TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (0, 0), (-1, -1), "CENTER"),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 8)])


def write_pdf(predictions: Sequence[Prediction], out: Path, run: RunInfo, *, lab: LabRecords | None = None,
              extra_columns: ExtraColumns | None = None, fallback: Path | None = None) -> Path:
    """Write the PDF report atomically (as `write_report`, whose signature it shares: a locked
    target gets a sibling, named by `fallback` when given); return the path written.  Raises
    `ReportError` when the folder cannot take it.  `lab` brings the identities, the reviewers'
    labels, the signatures and the lab's name; `extra_columns` (the app's reviewer columns) are
    the workbook's business: a reviewed field shows its reviewer's label from `lab.reviewed`."""
    lab = lab or LabRecords()

    def write(tmp: Path) -> None:
        doc = _Doc(str(tmp), predictions, run, lab, lab.lab_name)
        doc.build(doc.story(), canvasmaker=_NumberedCanvas)

    return atomic_report_write(Path(out), write, fallback)


class _NumberedCanvas(Canvas):
    """Holds every page until the end, so each can say "page X of Y" (the count is known then)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._pages: list[dict] = []

    def showPage(self) -> None:
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        for number, state in enumerate(self._pages, start=1):
            self.__dict__.update(state)
            self.setFont("Helvetica", 8)
            self.drawRightString(PAGE_W - MARGIN, FOOTER_H - 20, f"page {number} of {len(self._pages)}")
            super().showPage()
        super().save()


class _Doc(BaseDocTemplate):
    """One page template per slide (its header names it, on every page the slide takes) and one for
    run-wide pages (no image classified, the images an interrupted run never reached)."""

    def __init__(self, filename: str, predictions: Sequence[Prediction], run: RunInfo, lab: LabRecords, lab_name: str) -> None:
        self.predictions, self.run, self.lab, self.lab_name = predictions, run, lab, lab_name
        self.slides = count_slides(predictions, lab.reviewed)
        self.images: dict[str, list[Prediction]] = {}
        for p in sorted(predictions, key=lambda p: natural_key(p.file)):
            self.images.setdefault(p.slide, []).append(p)
        title = f"bcc-desk report{' - ' + lab_name if lab_name else ''}"
        super().__init__(filename, pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=HEADER_H,
                         bottomMargin=FOOTER_H, title=title, author=lab_name or "bcc-desk", subject=DECISION_AID,
                         creator=f"bcc-desk {run.software_version}")
        names = [*self.slides, None]  # None: the run's own pages
        self.addPageTemplates([
            PageTemplate(id=_template(name), frames=[Frame(MARGIN, FOOTER_H, WIDTH, PAGE_H - HEADER_H - FOOTER_H, id="body",
                                                           leftPadding=0, rightPadding=0, topPadding=0)],
                         onPage=partial(self._decorate, name))
            for name in names])

    def story(self) -> list[Flowable]:
        story: list[Flowable] = []
        for name, count in self.slides.items():
            if story:
                story += [NextPageTemplate(_template(name)), PageBreak()]
            story += self._slide(name, count)
        if not self.slides:
            story.append(Paragraph("No image was classified in this run.", _CALL))
        if self.run.not_classified:
            if self.slides:
                story += [NextPageTemplate(_template(None)), PageBreak()]
            story += self._not_classified()
        return story

    # -- a slide's section ------------------------------------------------------------------

    def _slide(self, name: str, count: SlideCount) -> list[Flowable]:
        images = self.images[name]
        verdict = slide_verdict(count)
        out: list[Flowable] = [Paragraph(pdf_text(verdict.call), _CALL)]
        if verdict.to_review:
            out.append(Paragraph(f"<b>To review:</b> {pdf_text('; '.join(verdict.to_review))}", _WARN))
        if count.note:
            out.append(Paragraph(f"<b>Colour:</b> {pdf_text(count.note)}", _WARN))
        if self.lab.identity(name).note:
            out.append(Paragraph(f"<b>Lab note:</b> {pdf_text(self.lab.identity(name).note)}", _BODY))
        out += [Spacer(1, 6), self._counts(count)]
        flagged = [p for p in images if p.needs_review and p.error is None]
        out.append(Paragraph(f"Flagged fields ({len(flagged)})", _H2))
        out.append(self._gallery(flagged) if flagged else Paragraph("No field was flagged.", _BODY))
        broken = [p for p in images if p.error is not None]
        if broken:
            out.append(Paragraph(f"Unreadable images ({len(broken)})", _H2))
            rows = [[Paragraph(pdf_text(Path(p.file).name), _SMALL), Paragraph(pdf_text(p.error), _SMALL)] for p in broken]
            out.append(_table(rows, [WIDTH * 0.4, WIDTH * 0.6], header=["file", "why it could not be read"]))
        out.append(KeepTogether([Spacer(1, 18), Paragraph(self._sign_off(name), _BODY), Spacer(1, 8),
                                 Paragraph(pdf_text(self._provenance()), _SMALL)]))
        return out

    def _counts(self, count: SlideCount) -> Table:
        """Count and share per class with a bar each, then the slide's totals."""
        classes = [*self.run.classes, *(c for c in count.per_class if c not in self.run.classes)]
        rows: list[list[object]] = []
        for c in classes:
            share = count.share(c)
            rows.append([Paragraph(pdf_text(c), _BODY), count.per_class.get(c, 0), _pct(share), _bar(share or 0.0)])
        totals = [("images", count.images), ("classified", count.classified), ("flagged", count.flagged),
                  ("unreadable", count.unreadable)]
        if count.reviewed:
            totals.append(("labelled by a reviewer", count.reviewed))
        rows += [[Paragraph(label, _BODY), n, "", ""] for label, n in totals]
        table = _table(rows, [WIDTH * 0.42, WIDTH * 0.12, WIDTH * 0.12, WIDTH * 0.34], header=["class", "fields", "share", ""])
        table.setStyle(TableStyle([("ALIGN", (1, 0), (2, -1), "RIGHT"),
                                   ("LINEABOVE", (0, len(classes) + 1), (-1, len(classes) + 1), 0.8, colors.black)]))
        return table

    def _gallery(self, flagged: Sequence[Prediction]) -> Table:
        """Every flagged field: thumbnail, name, label and confidence, why; rows split over pages."""
        cells: list[Any] = []  # a cell: its flowables, stacked; "" pads the last row
        for p in flagged:
            reviewed = self.lab.reviewed.get(p.path)
            lines = [f"<b>{pdf_text(Path(p.file).name)}</b>", f"{pdf_text(p.label)} {_pct(p.confidence)}",
                     *([f"reviewer: {pdf_text(reviewed)}"] if reviewed else []), f"<i>{pdf_text(p.review_reason)}</i>"]
            cells.append([_Thumb(p.path), *(Paragraph(line, _CELL) for line in lines)])
        rows = [cells[i:i + PER_ROW] for i in range(0, len(cells), PER_ROW)]
        rows[-1] += [""] * (PER_ROW - len(rows[-1]))
        return Table(rows, colWidths=[WIDTH / PER_ROW] * PER_ROW, style=_GRID, hAlign="LEFT")

    def _sign_off(self, name: str) -> str:
        signed = self.lab.signatures.get(name)
        if signed is None:
            return "Reviewed and signed by: ______________________________&nbsp;&nbsp;&nbsp; Date: ______________"
        return f"<b>Signed by {pdf_text(signed.by)} at {_local(signed.at):%Y-%m-%d %H:%M}</b>"

    def _provenance(self) -> str:
        models = "; ".join(f"{n} sha256 {sha}" for n, sha in self.run.models) or "no model"
        return (f"Model: {models} ({self.run.model_verdict}). bcc-desk {self.run.software_version}, "
                f"run started {self.run.started.astimezone():%Y-%m-%d %H:%M}.")

    # -- run-wide pages ---------------------------------------------------------------------

    def _not_classified(self) -> list[Flowable]:
        files = sorted(self.run.not_classified, key=natural_key)
        rows = [[Paragraph(pdf_text(f), _SMALL)] for f in files]
        return [Paragraph("Not classified", _CALL),
                Paragraph(pdf_text(f"{self._interrupted()}. Nobody may take these images for classified:"), _BODY),
                Spacer(1, 6), _table(rows, [WIDTH], header=["file"])]

    def _interrupted(self) -> str:
        done, left = len(self.predictions), len(self.run.not_classified)
        return f"Run interrupted after {done} of {done + left} images; {left} {'image was' if left == 1 else 'images were'} not classified"

    # -- header and footer, drawn on the canvas (plain text: nothing is parsed) --------------

    def _decorate(self, slide: str | None, canvas: Canvas, doc: BaseDocTemplate) -> None:
        canvas.saveState()
        top = PAGE_H - 30
        canvas.setFont("Helvetica-Bold", 9)
        _fit(canvas, MARGIN, top, self.lab_name, WIDTH - 110)
        canvas.setFont("Helvetica", 9)
        canvas.drawRightString(PAGE_W - MARGIN, top, "bcc-desk report")
        canvas.setFont("Helvetica-Bold", 14)
        _fit(canvas, MARGIN, top - 19, f"Slide {slide}" if slide is not None else f"Run of {self.run.started.astimezone():%Y-%m-%d %H:%M}")
        if slide is not None:
            ident = self.lab.identity(slide)
            canvas.setFont("Helvetica", 9)
            # each field cut to a third, so a long patient id cannot push the accession off the page
            fields = (_cut(f"{h}: {v or NONE}", "Helvetica", 9, WIDTH / 3 - 12) for h, v in ident.items()[:3])
            _fit(canvas, MARGIN, top - 34, "     ".join(fields))
        warnings = [UNVALIDATED_WARNING.replace("see the Run sheet", "see the end of each slide")] if self.run.unvalidated else []
        if self.run.not_classified:
            warnings.append(self._interrupted() + (" (listed on the last page)" if slide is not None else ""))
        if warnings:
            canvas.setFont("Helvetica-Bold", 8)
            canvas.setFillColor(colors.HexColor("#b00020"))
            _fit(canvas, MARGIN, top - 47, ".  ".join(warnings))
        canvas.setStrokeColor(colors.grey)
        canvas.line(MARGIN, PAGE_H - HEADER_H + 10, PAGE_W - MARGIN, PAGE_H - HEADER_H + 10)
        canvas.line(MARGIN, FOOTER_H - 8, PAGE_W - MARGIN, FOOTER_H - 8)
        canvas.setFillColor(colors.black)
        canvas.setFont("Helvetica", 7)
        models = ", ".join(f"{n} ({sha[:12]})" for n, sha in self.run.models) or "no model"
        _fit(canvas, MARGIN, FOOTER_H - 20, f"{models}  \u00b7  bcc-desk {self.run.software_version}  \u00b7  "
             f"run {self.run.started.astimezone():%Y-%m-%d %H:%M}", WIDTH - 70)
        canvas.setFont("Helvetica-Oblique", 7)
        canvas.drawString(MARGIN, FOOTER_H - 30, DECISION_AID)
        canvas.restoreState()


def _template(slide: str | None) -> str:
    return "run" if slide is None else f"slide:{slide}"


def _fit(canvas: Canvas, x: float, y: float, text: str, width: float = WIDTH) -> None:
    """Draw `text` cut to `width`: a 200-character slide name must not run off the page."""
    canvas.drawString(x, y, _cut(text, canvas._fontname, canvas._fontsize, width))


def _cut(text: str, font: str, size: float, width: float) -> str:
    if stringWidth(text, font, size) <= width:
        return text
    while text and stringWidth(text + "\u2026", font, size) > width:
        text = text[:-1]
    return text + "\u2026"


def _table(rows: list[list[object]], widths: list[float], header: list[str]) -> Table:
    # headers are ours and plain strings (never parsed), so the columns' ALIGN applies to them too
    table = Table([header, *rows], colWidths=widths, repeatRows=1, hAlign="LEFT")
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "MIDDLE"), ("FONTSIZE", (0, 0), (-1, -1), 9),
                               ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                               ("LINEBELOW", (0, 0), (-1, 0), 0.8, colors.black),
                               ("LINEBELOW", (0, 1), (-1, -1), 0.25, colors.lightgrey),
                               ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]))
    return table


def _bar(share: float, width: float = 150, height: float = 8) -> Drawing:
    d = Drawing(width, height)
    d.add(Rect(0, 0, width, height, fillColor=colors.HexColor("#eeeeee"), strokeColor=None))
    d.add(Rect(0, 0, width * share, height, fillColor=colors.HexColor("#4f6d8f"), strokeColor=None))
    return d


class _Thumb(Flowable):
    """A field's thumbnail (upright, a small JPEG), read only when its page is drawn: a run with
    thousands of flagged fields never holds them all in memory.  A file that cannot be opened now
    (moved, deleted or damaged since the run) prints a note in its box: a report is never lost
    to one image."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.width, self.height = path, THUMB, THUMB

    def draw(self) -> None:
        try:
            im = open_image(self.path, reduce_to=2 * THUMB)
        except ImageReadError as exc:
            self.canv.setStrokeColor(colors.grey)
            self.canv.rect(0, 0, THUMB, THUMB)
            self.canv.setFont("Helvetica", 7)
            for i, line in enumerate(simpleSplit(f"image not available: {exc}", "Helvetica", 7, THUMB - 8)[:8]):
                self.canv.drawCentredString(THUMB / 2, THUMB * 0.6 - 9 * i, line)
            return
        im.thumbnail((2 * THUMB, 2 * THUMB))  # twice the points: sharp on paper, ~12 kB each
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        w, h = (THUMB * d / max(im.size) for d in im.size)
        self.canv.drawImage(ImageReader(buf), (THUMB - w) / 2, (THUMB - h) / 2, w, h)


def _pct(x: float | None) -> str:
    return NONE if x is None else f"{round(100 * x)}%"
