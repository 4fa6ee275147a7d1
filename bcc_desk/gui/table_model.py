"""The image table: one row per Prediction, plus the reviewer's label beside the model's.

A Qt model/view rather than a widget per cell, so a folder of 5,000 images costs only the rows
on screen.  The rows and reviews themselves live in a Qt-free `bcc_desk.review.ReviewSession`
that this model observes.  `PredictionFilter` does the sorting and the filters (class, slide,
flagged only, errors only, file-name search).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSize,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QFont

from bcc_desk.gui.palette import ERROR_BACKGROUND, ERROR_TEXT, FLAGGED_BACKGROUND, class_name, label_text
from bcc_desk.gui.thumbnails import ThumbnailCache
from bcc_desk.prediction import REVIEW_LOW_CONFIDENCE, Prediction
from bcc_desk.review import Review, ReviewSession

THUMB, FILE, SLIDE, LABEL, CONFIDENCE, NEEDS_REVIEW, REVIEWER_LABEL, ERROR = range(8)
# "Model ..." vs "Reviewer's ...": whose word each column is, so the model's flag is never read
# as a person's review.
HEADERS = ("", "File", "Slide", "Model label", "Confidence", "Needs review", "Reviewer's label", "Error")
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
UNSURE_ROLE = Qt.ItemDataRole.UserRole + 2
"""Whether the row is flagged for low confidence (the cut-off depends on the image's slide)."""
FLAG_MARK = "\u2691"  # ⚑

_Index = QModelIndex | QPersistentModelIndex
_ROOT = QModelIndex()


def review_sort_key(p: Prediction) -> float:
    """Flagged first (least confident first), then the rest by confidence, unreadable last:
    the order in which a reviewer should look."""
    if p.error is not None:
        return 4.0
    return (0.0 if p.needs_review else 2.0) + (p.confidence or 0.0)


class PredictionTableModel(QAbstractTableModel):
    """The rows of a `ReviewSession` as a Qt model; columns as in `HEADERS`.  It only observes:
    rows and reviews change in the session, which says so through its signals."""

    def __init__(self, session: ReviewSession, thumbnails: ThumbnailCache | None = None, parent=None) -> None:
        super().__init__(parent)
        self.session = session
        self._bold = QFont()
        self._bold.setBold(True)
        self.thumbnails = thumbnails
        # Python methods (not Qt's own): psygnal holds them weakly and can read their signature.
        session.resetting.connect(self._resetting)
        session.reset.connect(self._reset)
        session.inserting.connect(self._inserting)
        session.inserted.connect(self._inserted)
        session.changed.connect(self._changed)
        if thumbnails is not None:
            thumbnails.ready.connect(self._thumbnail_ready)

    def _resetting(self) -> None:
        self.beginResetModel()

    def _inserting(self, first: int, last: int) -> None:
        self.beginInsertRows(QModelIndex(), first, last)

    def _inserted(self, first: int, last: int) -> None:
        self.endInsertRows()

    def _changed(self, first: int, last: int) -> None:
        self.dataChanged.emit(self.index(first, 0), self.index(last, len(HEADERS) - 1))

    def _reset(self) -> None:
        self.endResetModel()
        if self.thumbnails is not None:
            self.thumbnails.clear()

    def prediction(self, row: int) -> Prediction:
        return self.session.prediction(row)

    def review(self, row: int) -> Review | None:
        return self.session.review(row)

    def row_of(self, path: Path) -> int | None:
        return self.session.row_of(path)

    # -- Qt model -----------------------------------------------------------------------------
    def rowCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self.session)

    def columnCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(HEADERS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return HEADERS[section]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return _HEADER_TIPS.get(section)
        return None

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        row, col = index.row(), index.column()
        p = self.session.prediction(row)
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(p, row, col)
        if role == SORT_ROLE:
            return self._sort_value(p, row, col)
        if role == UNSURE_ROLE:
            return REVIEW_LOW_CONFIDENCE in p.review_reason.split("; ")
        if role == Qt.ItemDataRole.DecorationRole and col == THUMB and self.thumbnails is not None:
            return self.thumbnails.get(p.path)
        if role == Qt.ItemDataRole.SizeHintRole and col == THUMB and self.thumbnails is not None:
            return QSize(self.thumbnails.size + 4, self.thumbnails.size + 4)
        if role == Qt.ItemDataRole.BackgroundRole:
            if p.error is not None:
                return ERROR_BACKGROUND
            if p.needs_review:
                return FLAGGED_BACKGROUND
            return None
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(p, row, col)
        if role == Qt.ItemDataRole.ForegroundRole and col in (LABEL, ERROR) and p.error is not None:
            return ERROR_TEXT
        if role == Qt.ItemDataRole.FontRole and col == REVIEWER_LABEL:
            review = self.session.review(row)
            if review is not None and review.label != p.label:
                return self._bold  # a correction stands out
        return None

    def _display(self, p: Prediction, row: int, col: int):
        if col == FILE:
            return p.file
        if col == SLIDE:
            return p.slide
        if col == LABEL:
            return label_text(p)
        if col == CONFIDENCE:
            return "" if p.confidence is None else f"{p.confidence:.1%}"
        if col == NEEDS_REVIEW:
            return f"{FLAG_MARK} {p.review_reason}" if p.needs_review else ""
        if col == REVIEWER_LABEL:
            review = self.session.review(row)
            return class_name(review.label) if review is not None else ""
        if col == ERROR:
            return p.error or ""
        return None

    def _sort_value(self, p: Prediction, row: int, col: int):
        if col == CONFIDENCE:
            return -1.0 if p.confidence is None else p.confidence
        if col == NEEDS_REVIEW:
            return review_sort_key(p)
        if col == THUMB:
            return row
        if col == LABEL and p.error is not None:
            return "\uffff" + p.error.casefold()  # unreadable after every class
        value = self._display(p, row, col)
        return value.casefold() if isinstance(value, str) else value

    def _tooltip(self, p: Prediction, row: int, col: int) -> str | None:
        if col in (THUMB, FILE):
            return str(p.path)
        if col == NEEDS_REVIEW and p.needs_review:
            return f"flagged for review: {p.review_reason}"
        if col == CONFIDENCE and p.probabilities:
            return "\n".join(f"{class_name(c)}: {v:.1%}" for c, v in p.probabilities.items())
        if col == REVIEWER_LABEL:
            review = self.session.review(row)
            if review is not None:
                when = review.at.astimezone().strftime("%Y-%m-%d %H:%M")
                model = class_name(p.label) if p.error is None else "unreadable"
                return f"{class_name(review.label)}, by {review.by} at {when} (model: {model})"
        if col in (LABEL, ERROR) and p.error:
            return f"This image could not be read, so it was not classified:\n{p.error}"
        return None

    def _thumbnail_ready(self, path: Path) -> None:
        row = self.session.row_of(path)
        if row is not None:
            index = self.index(row, THUMB)
            self.dataChanged.emit(index, index, [Qt.ItemDataRole.DecorationRole])


_HEADER_TIPS = {
    LABEL: "The class the model gave the image (or why the image could not be read)",
    CONFIDENCE: "Calibrated probability of the model's label",
    NEEDS_REVIEW: f"The model's flag, not a review: {FLAG_MARK} means a person should look "
                  "(low confidence, or unlike the training data)",
    REVIEWER_LABEL: "The label a person gave the image (keys 1-9 set it, 0 clears it)",
    ERROR: "Why the image could not be read",
}


class PredictionFilter(QSortFilterProxyModel):
    """Sorting and the table's filters.  Filters test the model's own fields, so reviewing a
    row never makes it jump out of the view under the reviewer's hands."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setSortRole(SORT_ROLE)
        self.setDynamicSortFilter(True)
        self._label: str | None = None
        self._slide: str | None = None
        self._flagged_only = False
        self._errors_only = False
        self._search = ""

    def source(self) -> PredictionTableModel:
        model = self.sourceModel()
        assert isinstance(model, PredictionTableModel)
        return model

    def _refilter(self, attr: str, value: object) -> None:
        if getattr(self, attr) == value:
            return
        # Qt 6.10 replaced invalidateFilter() by begin/endFilterChange(); older Qt has only the former.
        if hasattr(self, "endFilterChange"):
            self.beginFilterChange()
            setattr(self, attr, value)
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            setattr(self, attr, value)
            self.invalidateFilter()

    def set_label(self, label: str | None) -> None:
        self._refilter("_label", label or None)

    def set_slide(self, slide: str | None) -> None:
        self._refilter("_slide", slide or None)

    def set_flagged_only(self, on: bool) -> None:
        self._refilter("_flagged_only", bool(on))

    def set_errors_only(self, on: bool) -> None:
        self._refilter("_errors_only", bool(on))

    def set_search(self, text: str) -> None:
        self._refilter("_search", text.strip().casefold())

    def filterAcceptsRow(self, source_row: int, source_parent: _Index) -> bool:
        p = self.source().prediction(source_row)
        if self._flagged_only and not p.needs_review:
            return False
        if self._errors_only and p.error is None:
            return False
        if self._label is not None and p.label != self._label:
            return False
        if self._slide is not None and p.slide != self._slide:
            return False
        return not self._search or self._search in p.file.casefold()

    def source_row(self, proxy_row: int) -> int:
        return self.mapToSource(self.index(proxy_row, 0)).row()
