"""Per slide: whose it is, what its fields say together (the verdict), how many images of each
class in numbers and as a small stacked bar chart, and who signed it.

The pane observes plain state: `refresh` is handed the counts (`ReviewSession.slide_counts`) and
the lab's records (`ReviewSession.lab_records`: identities, signatures) whole, and the verdict is
`bcc_desk.verdict.slide_verdict` of each count, so the pane says what the report's Slides sheet
and PDF say.  Counts use the reviewer's label where there is one (the lab's answer), the model's
elsewhere.  The chart is painted with QPainter (QtCharts is not part of PySide6-Essentials).

`SlideDetailsDialog` edits a slide's identity (the row of `slides.csv`); it is handed the
function that saves it, so it holds no file logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QRectF, QSize, Qt, Signal
from PySide6.QtGui import QAction, QBrush, QPainter
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QScrollArea,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from bcc_desk.gui.palette import ERROR_TEXT, FLAGGED_BACKGROUND, class_colour, class_name
from bcc_desk.lab_records import MAX_CHARS, LabRecords, Signature, SlideIdentity, SlidesFileError, checked_identity
from bcc_desk.slides import SlideCount
from bcc_desk.verdict import DECISION_AID, SlideVerdict, slide_verdict

TO_REVIEW_MARK = "\u26a0 "
"""Put before the verdict of a slide a person must look at before signing (with the amber fill)."""


def signature_text(signature: Signature | None) -> str:
    """"name, YYYY-MM-DD HH:MM" in local time ('' when not signed)."""
    if signature is None:
        return ""
    return f"{signature.by}, {signature.at.astimezone():%Y-%m-%d %H:%M}"


class SlideChart(QWidget):
    """One stacked horizontal bar per slide: the share of each class among its readable images."""

    ROW = 18

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._classes: list[str] = []
        self._slides: dict[str, SlideCount] = {}

    def set_data(self, classes: list[str], slides: dict[str, SlideCount]) -> None:
        self._classes = list(classes)
        self._slides = slides
        self.setMinimumHeight(self._height())
        self.updateGeometry()
        self.update()

    def _height(self) -> int:
        return 26 + self.ROW * max(1, len(self._slides))

    def sizeHint(self) -> QSize:
        return QSize(320, self._height())

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        fm = painter.fontMetrics()
        text = self.palette().color(self.foregroundRole())
        # Legend
        x = 4.0
        for i, c in enumerate(self._classes):
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(class_colour(i))
            painter.drawRect(QRectF(x, 6, 10, 10))
            painter.setPen(text)
            name = class_name(c)
            painter.drawText(QRectF(x + 14, 0, fm.horizontalAdvance(name) + 4, 22), Qt.AlignmentFlag.AlignVCenter, name)
            x += 24 + fm.horizontalAdvance(name)
        if not self._slides:
            painter.end()
            return
        label_w = min(max(fm.horizontalAdvance(s) for s in self._slides) + 8, self.width() * 0.4)
        count_w = fm.horizontalAdvance("00000") + 6
        bar_w = max(10.0, self.width() - label_w - count_w - 8)
        for r, (slide, count) in enumerate(self._slides.items()):
            y = 24 + r * self.ROW
            painter.setPen(text)
            elided = fm.elidedText(slide, Qt.TextElideMode.ElideMiddle, int(label_w - 6))
            painter.drawText(QRectF(2, y, label_w - 6, self.ROW), Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignRight, elided)
            total = sum(count.per_class.get(c, 0) for c in self._classes)
            left = label_w
            painter.setPen(Qt.PenStyle.NoPen)
            for i, c in enumerate(self._classes):
                n = count.per_class.get(c, 0)
                if total and n:
                    w = bar_w * n / total
                    painter.setBrush(class_colour(i))
                    painter.drawRect(QRectF(left, y + 3, w, self.ROW - 6))
                    left += w
            painter.setPen(text)
            painter.drawText(QRectF(label_w + bar_w + 4, y, count_w, self.ROW), Qt.AlignmentFlag.AlignVCenter, str(count.images))
        painter.end()


class SlideSummary(QWidget):
    """The slide table and chart side by side (a dock of the main window), the slide actions
    (details, sign, remove the signature) above them and the decision-aid sentence below.

    `slide_selected(slide)` ('' for none) when the selected row changes; `details_requested(slide)`
    on a double-click of a row."""

    slide_selected = Signal(str)
    details_requested = Signal(str)

    FIXED_BEFORE = ("Slide", "Patient id", "Verdict", "To review", "Images")
    FIXED_AFTER = ("Flagged", "Unreadable", "Reviewed", "Signed", "Note")
    VERDICT = FIXED_BEFORE.index("Verdict")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.table = QTableWidget(0, 0, self)
        self.table.setObjectName("slide-table")
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.itemSelectionChanged.connect(lambda: self.slide_selected.emit(self.selected_slide() or ""))
        self.table.itemDoubleClicked.connect(lambda item: self._double_clicked(item.row()))
        self.chart = SlideChart()
        scroll = QScrollArea(self)
        scroll.setWidget(self.chart)
        scroll.setWidgetResizable(True)
        splitter = QSplitter(Qt.Orientation.Horizontal, self)
        splitter.addWidget(self.table)
        splitter.addWidget(scroll)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self._tools = QHBoxLayout()
        self._tools.setContentsMargins(4, 2, 4, 0)
        self.signed_label = QLabel("")
        self.signed_label.setObjectName("signed-count")
        self._tools.addStretch(1)
        self._tools.addWidget(self.signed_label)
        self.decision_aid = QLabel(DECISION_AID)
        self.decision_aid.setObjectName("decision-aid")
        self.decision_aid.setWordWrap(True)
        self.decision_aid.setContentsMargins(4, 0, 4, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(self._tools)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.decision_aid)
        self.slides: dict[str, SlideCount] = {}
        self.verdicts: dict[str, SlideVerdict] = {}
        self.lab = LabRecords()

    def add_actions(self, actions: list[QAction]) -> None:
        """Buttons for the window's slide actions, above the table (the actions stay the
        window's: their menus, shortcuts and enabled state are its own)."""
        for action in actions:
            button = QToolButton(self)
            button.setDefaultAction(action)
            button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
            self._tools.insertWidget(self._tools.count() - 2, button)

    def selected_slide(self) -> str | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        row = rows[0].row() if rows else -1
        names = list(self.slides)
        return names[row] if 0 <= row < len(names) else None

    def select_slide(self, slide: str | None) -> None:
        """Select `slide`'s row (None: none)."""
        names = list(self.slides)
        if slide in names:
            self.table.selectRow(names.index(slide))
        else:
            self.table.clearSelection()

    def _double_clicked(self, row: int) -> None:
        names = list(self.slides)
        if 0 <= row < len(names):
            self.details_requested.emit(names[row])

    def _item(self, row: int, col: int) -> QTableWidgetItem:
        """The table's cell, made on first use."""
        item = self.table.item(row, col)
        if item is None:
            item = QTableWidgetItem()
            self.table.setItem(row, col, item)
        return item

    def headers(self, classes: list[str]) -> list[str]:
        return [*self.FIXED_BEFORE, *(class_name(c) for c in classes), *self.FIXED_AFTER]

    def refresh(self, classes: list[str], slides: dict[str, SlideCount], lab: LabRecords | None = None) -> None:
        """Show `slides` (`ReviewSession.slide_counts`: natural order, reviews counted) with
        `lab` (`ReviewSession.lab_records`: the slides' identities and signatures)."""
        selected = self.selected_slide()
        self.slides = slides
        self.lab = lab if lab is not None else LabRecords()
        self.verdicts = {name: slide_verdict(count) for name, count in slides.items()}
        headers = self.headers(classes)
        self.table.setUpdatesEnabled(False)
        self.table.blockSignals(True)  # a refresh is not a new selection
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setRowCount(len(self.slides))
        numbers = {*range(len(self.FIXED_BEFORE) - 1, len(headers) - 2)}  # images .. reviewed: right-aligned
        for r, (slide, count) in enumerate(self.slides.items()):
            verdict = self.verdicts[slide]
            signature = self.lab.signatures.get(slide)
            identity = self.lab.identity(slide)
            cells: list[str] = [slide, identity.patient_id,
                                (TO_REVIEW_MARK if verdict.to_review else "") + verdict.call,
                                "; ".join(verdict.to_review), str(count.images)]
            for c in classes:
                cells.append(f"{count.per_class.get(c, 0)} ({count.share(c) or 0.0:.0%})")
            cells += [str(count.flagged), str(count.unreadable), str(count.reviewed), signature_text(signature),
                      count.note]
            for col, text in enumerate(cells):
                item = self._item(r, col)
                item.setText(text)
                item.setToolTip("")
                item.setBackground(QBrush())
                item.setTextAlignment((Qt.AlignmentFlag.AlignRight if col in numbers else Qt.AlignmentFlag.AlignLeft)
                                      | Qt.AlignmentFlag.AlignVCenter)
            self._item(r, 1).setToolTip("\n".join(f"{h}: {v}" for h, v in identity.items() if v))
            verdict_item = self._item(r, self.VERDICT)
            if verdict.to_review:  # a person must look before signing: amber, as flagged images are
                verdict_item.setBackground(FLAGGED_BACKGROUND)
                verdict_item.setToolTip(verdict.review_text)
            signed_item = self._item(r, len(headers) - 2)
            signed_item.setToolTip(f"signed by {signature.by} at {signature.at.astimezone():%Y-%m-%d %H:%M:%S %Z}"
                                   if signature else "not signed")
        self.table.setUpdatesEnabled(True)
        if selected is not None:
            self.select_slide(selected)
        self.table.blockSignals(False)
        signed = sum(1 for name in self.slides if name in self.lab.signatures)
        self.signed_label.setText(f"{signed} of {len(self.slides)} slides signed" if self.slides else "")
        self.chart.set_data(classes, self.slides)
        if selected != self.selected_slide():  # its row went (another folder opened)
            self.slide_selected.emit(self.selected_slide() or "")


class SlideDetailsDialog(QDialog):
    """A slide's identity, as a row of `slides.csv`: patient id, accession, specimen date
    (YYYY-MM-DD) and a lab note.  OK checks the fields (`checked_identity`) and calls `save`;
    when either refuses (a bad date, a file that cannot be written), the dialog says why and
    stays open, and nothing has changed."""

    def __init__(self, slide: str, identity: SlideIdentity, save: Callable[[SlideIdentity], object],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.slide = slide
        self._save = save
        self.setWindowTitle(f"Slide details \u2014 {slide}")
        self.patient_id = QLineEdit(identity.patient_id)
        self.accession = QLineEdit(identity.accession)
        self.specimen_date = QLineEdit(identity.specimen_date)
        self.specimen_date.setPlaceholderText("YYYY-MM-DD")
        self.note = QLineEdit(identity.note)
        for edit in (self.patient_id, self.accession, self.specimen_date, self.note):
            edit.setMaxLength(MAX_CHARS)
        form = QFormLayout()
        form.addRow("Slide:", QLabel(slide))
        form.addRow("&Patient id:", self.patient_id)
        form.addRow("&Accession:", self.accession)
        form.addRow("Specimen &date:", self.specimen_date)
        form.addRow("Lab &note:", self.note)
        self.message = QLabel("")
        self.message.setObjectName("message")
        self.message.setWordWrap(True)
        self.message.setStyleSheet(f"color: {ERROR_TEXT.name()}")
        self.message.setVisible(False)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.message)
        layout.addWidget(self.buttons)

    def identity(self) -> SlideIdentity:
        """The fields as typed."""
        return SlideIdentity(self.patient_id.text(), self.accession.text(), self.specimen_date.text(), self.note.text())

    def accept(self) -> None:
        try:
            self._save(checked_identity(self.identity()))
        except (SlidesFileError, OSError) as exc:
            self.message.setText(f"Not saved: {exc}")
            self.message.setVisible(True)
            return
        super().accept()
