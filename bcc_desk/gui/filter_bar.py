"""The table's filters (class, slide, flagged only, errors only, a file-name search) and how many
rows they leave: a row of widgets over the `PredictionFilter` proxy."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QLineEdit, QWidget

from bcc_desk.gui.palette import class_name
from bcc_desk.gui.table_model import PredictionFilter

ALL = "__all__"


class FilterBar(QWidget):
    """Every filter of the table; `changed` after any of them moved (the window recounts)."""

    changed = Signal()

    def __init__(self, proxy: PredictionFilter, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.proxy = proxy
        self.class_filter = QComboBox()
        self.class_filter.setToolTip("Show one class (the model's label)")
        self.class_filter.currentIndexChanged.connect(
            lambda _: self._refilter(self.proxy.set_label, _value(self.class_filter)))
        self.slide_filter = QComboBox()
        self.slide_filter.setToolTip("Show one slide")
        self.slide_filter.setMinimumContentsLength(12)
        self.slide_filter.addItem("All slides", ALL)
        self.slide_filter.currentIndexChanged.connect(
            lambda _: self._refilter(self.proxy.set_slide, _value(self.slide_filter)))
        self.flagged_only = QCheckBox("Flagged only")
        self.flagged_only.toggled.connect(partial(self._refilter, self.proxy.set_flagged_only))
        self.errors_only = QCheckBox("Errors only")
        self.errors_only.toggled.connect(partial(self._refilter, self.proxy.set_errors_only))
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search file names\u2026")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(partial(self._refilter, self.proxy.set_search))
        self.shown_label = QLabel("")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for w in (self.class_filter, self.slide_filter, self.flagged_only, self.errors_only):
            layout.addWidget(w)
        layout.addWidget(self.search, 1)
        layout.addWidget(self.shown_label)

    def _refilter(self, setter: Callable[[Any], None], value: Any) -> None:
        setter(value)
        self.changed.emit()

    def set_classes(self, classes: list[str]) -> None:
        """The class choices of a model (its output order), keeping the one chosen if it still exists."""
        current = _value(self.class_filter)
        self.class_filter.blockSignals(True)
        self.class_filter.clear()
        self.class_filter.addItem("All classes", ALL)
        for c in classes:
            self.class_filter.addItem(class_name(c), c)
        index = self.class_filter.findData(current) if current else 0
        self.class_filter.setCurrentIndex(max(0, index))
        self.class_filter.blockSignals(False)
        self.proxy.set_label(_value(self.class_filter))

    def clear_slides(self) -> None:
        """A new run: no slide chosen, none listed yet."""
        self.slide_filter.blockSignals(True)
        self.slide_filter.clear()
        self.slide_filter.addItem("All slides", ALL)
        self.slide_filter.blockSignals(False)
        self.proxy.set_slide(None)

    def add_slides(self, slides: set[str]) -> None:
        """List the slides not listed yet (in name order within each batch)."""
        for slide in sorted(slides):
            if self.slide_filter.findData(slide) < 0:
                self.slide_filter.addItem(slide, slide)

    def set_filters(
        self,
        label: str | None = None,
        slide: str | None = None,
        flagged_only: bool = False,
        errors_only: bool = False,
        search: str = "",
    ) -> None:
        """Set every filter at once through the widgets (what a user's clicks do)."""
        self.class_filter.setCurrentIndex(max(0, self.class_filter.findData(label)) if label else 0)
        self.slide_filter.setCurrentIndex(max(0, self.slide_filter.findData(slide)) if slide else 0)
        self.flagged_only.setChecked(flagged_only)
        self.errors_only.setChecked(errors_only)
        self.search.setText(search)

    def show_count(self, shown: int, total: int) -> None:
        self.shown_label.setText(f"{shown} of {total} shown")


def _value(combo: QComboBox) -> str | None:
    value = combo.currentData()
    return None if value in (None, ALL) else str(value)
