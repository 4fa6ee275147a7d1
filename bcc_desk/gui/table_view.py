"""The table of images: one row per image, a thumbnail first, sortable and filtered (through the
`PredictionFilter` proxy), rows selected whole."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView, QWidget

from bcc_desk.gui.delegates import ConfidenceDelegate
from bcc_desk.gui.table_model import (
    CONFIDENCE,
    ERROR,
    FILE,
    LABEL,
    NEEDS_REVIEW,
    REVIEWER_LABEL,
    SLIDE,
    THUMB,
    PredictionFilter,
    PredictionTableModel,
)
from bcc_desk.prediction import Prediction


class PredictionTable(QTableView):
    """The view of `proxy` over `model`, its rows `thumbnail` pixels high."""

    def __init__(self, model: PredictionTableModel, proxy: PredictionFilter, thumbnail: int,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.source, self.proxy = model, proxy
        self.setModel(proxy)
        self.setSortingEnabled(True)
        self.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # discovery order until asked
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setWordWrap(False)
        self.setAlternatingRowColors(False)
        vertical = self.verticalHeader()
        vertical.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)  # no per-row measuring
        vertical.setDefaultSectionSize(thumbnail + 4)
        vertical.setVisible(False)
        header = self.horizontalHeader()
        header.setSectionsMovable(True)
        header.setStretchLastSection(True)
        for col, width in ((THUMB, thumbnail + 8), (FILE, 220), (SLIDE, 110), (LABEL, 150),
                           (CONFIDENCE, 110), (NEEDS_REVIEW, 130), (REVIEWER_LABEL, 150), (ERROR, 160)):
            self.setColumnWidth(col, width)
        self.confidence_delegate = ConfidenceDelegate(self)
        self.setItemDelegateForColumn(CONFIDENCE, self.confidence_delegate)

    def flagged_first(self) -> None:
        """Flagged first, least confident on top, the first row selected."""
        self.sortByColumn(NEEDS_REVIEW, Qt.SortOrder.AscendingOrder)
        if self.proxy.rowCount():
            self.selectRow(0)
            self.scrollToTop()
        self.setFocus()

    def shown(self) -> list[Prediction]:
        """The rows as the table shows them now (filters and sort applied)."""
        return [self.source.prediction(self.proxy.source_row(r)) for r in range(self.proxy.rowCount())]

    def current_source_row(self) -> int | None:
        """The model row of the current index (None: none)."""
        current = self.currentIndex()
        return self.proxy.mapToSource(current).row() if current.isValid() else None

    def selected_source_rows(self) -> list[int]:
        """The model rows selected, or the current one when none is."""
        rows = sorted({self.proxy.mapToSource(i).row() for i in self.selectionModel().selectedRows()})
        if not rows and (current := self.current_source_row()) is not None:
            rows = [current]
        return rows

    def select_next(self) -> None:
        """Move the selection one row down (a reviewer goes key, key, key)."""
        current = self.currentIndex()
        next_row = current.row() + 1 if current.isValid() else 0
        if next_row < self.proxy.rowCount():
            self.selectRow(next_row)
