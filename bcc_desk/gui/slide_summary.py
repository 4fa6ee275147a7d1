"""Per slide: how many images of each class, in numbers and as a small stacked bar chart.

Counts (`bcc_desk.slides`, as the report's) use the reviewer's label where there is one (the
lab's answer), the model's elsewhere.
The chart is painted with QPainter (QtCharts is not part of PySide6-Essentials).
"""

from __future__ import annotations

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QScrollArea,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from bcc_desk.gui.palette import class_colour, class_name
from bcc_desk.slides import SlideCount


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
    """The slide table and chart side by side (a dock of the main window)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.table = QTableWidget(0, 0, self)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.chart = SlideChart()
        scroll = QScrollArea(self)
        scroll.setWidget(self.chart)
        scroll.setWidgetResizable(True)
        splitter = QSplitter(Qt.Orientation.Horizontal, self)
        splitter.addWidget(self.table)
        splitter.addWidget(scroll)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(splitter)
        self.slides: dict[str, SlideCount] = {}

    def refresh(self, classes: list[str], slides: dict[str, SlideCount]) -> None:
        """Show `slides` (`ReviewSession.slide_counts`: natural order, reviews counted)."""
        self.slides = slides
        headers = ["Slide", "Images", *(class_name(c) for c in classes), "Flagged", "Unreadable", "Reviewed", "Note"]
        self.table.setUpdatesEnabled(False)
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setRowCount(len(self.slides))
        for r, (slide, count) in enumerate(self.slides.items()):
            cells: list[str] = [slide, str(count.images)]
            for c in classes:
                cells.append(f"{count.per_class.get(c, 0)} ({count.share(c) or 0.0:.0%})")
            cells += [str(count.flagged), str(count.unreadable), str(count.reviewed), count.note]
            for col, text in enumerate(cells):
                item = self.table.item(r, col)
                if item is None:
                    item = QTableWidgetItem()
                    self.table.setItem(r, col, item)
                item.setText(text)
                if 0 < col < len(cells) - 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.table.setUpdatesEnabled(True)
        self.chart.set_data(classes, self.slides)
