"""Cell painting: confidence as a bar, so the unsure rows stand out while scrolling."""

from __future__ import annotations

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, QRectF, Qt
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import (
    QApplication,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
)

from bcc_desk.gui.table_model import SORT_ROLE, UNSURE_ROLE

_SURE = QColor("#6BAED6")
_UNSURE = QColor("#F4A259")


class ConfidenceDelegate(QStyledItemDelegate):
    """A horizontal bar of the confidence with the percentage on it; amber where the row is
    flagged for low confidence (below the cut-off for an image alone, or for one its slide agrees
    with)."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex) -> None:
        value = index.data(SORT_ROLE)
        if not isinstance(value, float) or value < 0:
            super().paint(painter, option, index)
            return
        opt = QStyleOptionViewItem(option)
        self.initStyleOption(opt, index)
        text = opt.text
        opt.text = ""
        style = opt.widget.style() if opt.widget is not None else QApplication.style()
        style.drawControl(QStyle.ControlElement.CE_ItemViewItem, opt, painter, opt.widget)
        rect = QRectF(opt.rect).adjusted(3, 4, -3, -4)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(0, 0, 0, 25))
        painter.drawRoundedRect(rect, 3, 3)
        bar = QRectF(rect)
        bar.setWidth(rect.width() * max(0.0, min(1.0, value)))
        painter.setBrush(_UNSURE if index.data(UNSURE_ROLE) else _SURE)
        painter.drawRoundedRect(bar, 3, 3)
        painter.setPen(opt.palette.color(opt.palette.ColorRole.Text))
        painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, text)
        painter.restore()
