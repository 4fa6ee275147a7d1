"""The selected image, large: zoom, every class probability, the review buttons, Grad-CAM.

Pixels are decoded and Grad-CAM is computed on pool threads (a backward pass of convnext_tiny
takes a good fraction of a second on a CPU); results for an image the user has already left
are dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PySide6.QtCore import QRectF, Qt, QThreadPool, Signal
from PySide6.QtGui import QColor, QImage, QKeySequence, QPainter, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QGraphicsPixmapItem,
    QGraphicsScene,
    QGraphicsView,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from bcc_desk.gui.jobs import submit
from bcc_desk.gui.palette import class_colour, class_name, label_text
from bcc_desk.gui.thumbnails import pil_to_qimage
from bcc_desk.prediction import Prediction
from bcc_desk.review import Review

if TYPE_CHECKING:
    from bcc_desk.gui.table_model import PredictionTableModel

CamSource = Callable[[], tuple]
"""Called on a pool thread: (network, InputSpec, classes) of the model to explain."""

_CAM_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CAM_RGB = np.array([[0, 0, 128], [0, 128, 255], [128, 255, 128], [255, 192, 0], [204, 0, 0]], dtype=np.float32)


def colour_heatmap(heat: np.ndarray) -> QImage:
    """A 0..1 map as a translucent jet-like RGBA image: hot areas strong, cold ones faint."""
    h = np.clip(heat, 0.0, 1.0)
    rgb = np.stack([np.interp(h, _CAM_STOPS, _CAM_RGB[:, i]) for i in range(3)], axis=-1)
    alpha = 50 + 150 * h
    rgba = np.ascontiguousarray(np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.uint8))
    height, width = h.shape
    return QImage(rgba.data, width, height, 4 * width, QImage.Format.Format_RGBA8888).copy()


class ImageView(QGraphicsView):
    """A zoomable, pannable picture with an optional overlay (the Grad-CAM map)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setScene(QGraphicsScene(self))
        self.setRenderHints(QPainter.RenderHint.SmoothPixmapTransform | QPainter.RenderHint.Antialiasing)
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setBackgroundBrush(QColor("#2b2b2b"))
        self.setMinimumSize(200, 200)
        self._image = QGraphicsPixmapItem()
        self._image.setTransformationMode(Qt.TransformationMode.SmoothTransformation)
        self._overlay = QGraphicsPixmapItem()
        self._overlay.setTransformationMode(Qt.TransformationMode.SmoothTransformation)
        self._overlay.setZValue(1)
        self.scene().addItem(self._image)
        self.scene().addItem(self._overlay)
        self._message = self.scene().addText("")
        self._message.setDefaultTextColor(QColor("#dddddd"))
        self._fit = True

    def set_image(self, image: QImage | None, message: str = "") -> None:
        self._image.setPixmap(QPixmap.fromImage(image) if image is not None else QPixmap())
        self._message.setPlainText(message)
        self._message.setVisible(bool(message))
        self.set_overlay(None)
        rect = self._image.boundingRect() if image is not None else self._message.boundingRect()
        self.scene().setSceneRect(rect)
        if self._fit:
            self.fit()

    def has_image(self) -> bool:
        return not self._image.pixmap().isNull()

    def set_overlay(self, overlay: QImage | None, box: QRectF | None = None) -> None:
        if overlay is None or box is None:
            self._overlay.setPixmap(QPixmap())
            self._overlay.setVisible(False)
            return
        self._overlay.setPixmap(QPixmap.fromImage(overlay))
        self._overlay.setPos(box.topLeft())
        self._overlay.setScale(box.width() / max(1, overlay.width()))
        self._overlay.setVisible(True)

    def overlay_visible(self) -> bool:
        return self._overlay.isVisible() and not self._overlay.pixmap().isNull()

    def zoom(self, factor: float) -> None:
        self._fit = False
        self.scale(factor, factor)

    def zoom_factor(self) -> float:
        return self.transform().m11()

    def fit(self) -> None:
        self._fit = True
        if not self.scene().sceneRect().isEmpty():
            self.fitInView(self.scene().sceneRect(), Qt.AspectRatioMode.KeepAspectRatio)

    def actual_size(self) -> None:
        self._fit = False
        self.resetTransform()

    def wheelEvent(self, event) -> None:
        steps = event.angleDelta().y() / 120
        if steps:
            self.zoom(1.25**steps)
        event.accept()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self._fit:
            self.fit()


class ProbabilityBars(QWidget):
    """Every class's probability as a labelled bar; the model's label and the reviewer's marked."""

    ROW = 20

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._classes: list[str] = []
        self._probs: dict[str, float] = {}
        self._model_label: str | None = None
        self._reviewed: str | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_classes(self, classes: list[str]) -> None:
        self._classes = list(classes)
        self.setFixedHeight(self.ROW * max(1, len(classes)) + 4)
        self.update()

    def set_values(self, probabilities: dict[str, float], model_label: str | None, reviewed: str | None) -> None:
        self._probs = dict(probabilities)
        self._model_label = model_label
        self._reviewed = reviewed
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        metrics = painter.fontMetrics()
        name_w = max([metrics.horizontalAdvance(class_name(c)) for c in self._classes] + [40]) + 28
        pct_w = metrics.horizontalAdvance("100.0%") + 8
        bar_w = max(10, self.width() - name_w - pct_w)
        for i, c in enumerate(self._classes):
            y = 2 + i * self.ROW
            marks = ("\u25cf " if c == self._model_label else "") + ("\u270e " if c == self._reviewed else "")
            font = painter.font()
            font.setBold(c == self._model_label)
            painter.setFont(font)
            painter.setPen(self.palette().color(self.foregroundRole()))
            painter.drawText(QRectF(0, y, name_w - 4, self.ROW), Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignRight,
                             f"{i + 1}  {marks}{class_name(c)}")
            value = self._probs.get(c)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor(0, 0, 0, 25))
            painter.drawRoundedRect(QRectF(name_w, y + 4, bar_w, self.ROW - 8), 3, 3)
            if value is not None:
                painter.setBrush(class_colour(i))
                painter.drawRoundedRect(QRectF(name_w, y + 4, bar_w * value, self.ROW - 8), 3, 3)
                painter.setPen(self.palette().color(self.foregroundRole()))
                painter.drawText(QRectF(name_w + bar_w + 4, y, pct_w, self.ROW), Qt.AlignmentFlag.AlignVCenter, f"{value:.1%}")
        painter.end()


class ImagePane(QWidget):
    """The right-hand side of the window: one image and what the model and reviewer said."""

    review_requested = Signal(object)
    """A class name the user picked for the current image, or None to clear the review."""
    image_shown = Signal()
    cam_shown = Signal()
    cam_failed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._prediction: Prediction | None = None
        self._classes: list[str] = []
        self._cam_source: CamSource | None = None
        self._cam_cache: OrderedDict[tuple, tuple[QImage, QRectF, str]] = OrderedDict()
        self._cam_busy: set[tuple] = set()
        self._image_pool = QThreadPool(self)
        self._image_pool.setMaxThreadCount(1)
        self._cam_pool = QThreadPool(self)
        self._cam_pool.setMaxThreadCount(1)

        self.title = QLabel("Open a folder to start")
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.title.setWordWrap(True)
        font = self.title.font()
        font.setBold(True)
        self.title.setFont(font)
        self.view = ImageView(self)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.info.setTextFormat(Qt.TextFormat.RichText)
        self.bars = ProbabilityBars(self)

        self.cam_toggle = QCheckBox("Grad-CAM")
        self.cam_toggle.setToolTip("Overlay where the model looked for its label (G)")
        self.cam_toggle.setShortcut(QKeySequence("G"))
        self.cam_toggle.toggled.connect(self._cam_toggled)
        self.cam_status = QLabel("")
        zoom_row = QHBoxLayout()
        for text, tip, slot in (
            ("Fit", "Fit the image in the pane", self.view.fit),
            ("1:1", "Actual pixels", self.view.actual_size),
            ("+", "Zoom in (or the mouse wheel)", lambda: self.view.zoom(1.25)),
            ("\u2212", "Zoom out", lambda: self.view.zoom(0.8)),
        ):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.setFocusPolicy(Qt.FocusPolicy.NoFocus)
            button.setMaximumWidth(44)
            button.clicked.connect(slot)
            zoom_row.addWidget(button)
        zoom_row.addStretch(1)
        zoom_row.addWidget(self.cam_status)
        zoom_row.addWidget(self.cam_toggle)

        self.review_row = QHBoxLayout()
        self.review_row.addWidget(QLabel("Review:"))
        self._review_buttons: list[QPushButton] = []
        self.review_row.addStretch(1)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.title)
        layout.addLayout(zoom_row)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.info)
        layout.addWidget(self.bars)
        layout.addLayout(self.review_row)

    # -- setup --------------------------------------------------------------------------------
    def set_classes(self, classes: list[str]) -> None:
        if classes == self._classes:
            return
        self._classes = list(classes)
        self.bars.set_classes(classes)
        for button in self._review_buttons:
            self.review_row.removeWidget(button)
            button.deleteLater()
        self._review_buttons = []
        labels = [(f"{i + 1} {class_name(c)}", c) for i, c in enumerate(classes[:9])] + [("0 clear", None)]
        for text, label in labels:
            button = QPushButton(text)
            button.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # keys stay with the table
            button.setToolTip(f"Set the reviewer's label to {class_name(label)}" if label else "Remove the reviewer's label")
            button.clicked.connect(lambda _=False, lab=label: self.review_requested.emit(lab))
            self.review_row.insertWidget(self.review_row.count() - 1, button)
            self._review_buttons.append(button)
        self._update_review_buttons()

    @property
    def class_buttons(self) -> list[QPushButton]:
        """The "set the reviewer's label" buttons, one per class (without "0 clear")."""
        return self._review_buttons[:-1]

    def _update_review_buttons(self) -> None:
        """A class can be given only to an image a person can see (clearing stays possible)."""
        p = self._prediction
        for button in self.class_buttons:
            button.setEnabled(p is not None and p.error is None)

    def set_cam_source(self, source: CamSource | None) -> None:
        """Where Grad-CAM gets its network; changing the model clears the cached maps."""
        self._cam_source = source
        self._cam_cache.clear()
        if self._prediction is not None and self.cam_toggle.isChecked():
            self._request_cam()

    def shutdown(self) -> None:
        """Wait for the image and Grad-CAM threads (the window is closing)."""
        self._image_pool.waitForDone()
        self._cam_pool.waitForDone()

    # -- content ------------------------------------------------------------------------------
    @property
    def prediction(self) -> Prediction | None:
        return self._prediction

    def show_prediction(self, prediction: Prediction | None, review: Review | None) -> None:
        same_image = prediction is not None and self._prediction is not None and prediction.path == self._prediction.path
        self._prediction = prediction
        self.update_review(review)
        self._update_review_buttons()
        if prediction is None:
            self.title.setText("No image selected")
            self.view.set_image(None)
            return
        self.title.setText(f"{prediction.file}   \u2014   slide {prediction.slide}")
        if same_image and self.view.has_image():
            return
        self.view.set_image(None, "loading\u2026")
        path = prediction.path
        submit(self._image_pool, lambda: _load_full(path), partial(self._image_loaded, path),
               partial(self._image_failed, path))

    def forget(self, path: Path) -> None:
        """The file at `path` has new content: drop its Grad-CAM maps, and its picture when shown
        (the next `show_prediction` loads it again)."""
        for key in [k for k in self._cam_cache if k[0] == path]:
            del self._cam_cache[key]
        if self._prediction is not None and self._prediction.path == path:
            self.view.set_image(None)

    def rows_changed(self, model: PredictionTableModel, first: int, last: int) -> None:
        """Rows `first`..`last` of `model` changed: follow the image shown, if among them (its
        review, or its flags judged again as its slide grew)."""
        shown = self.prediction
        row = model.row_of(shown.path) if shown is not None else None
        if row is None or not first <= row <= last:
            return
        now = model.prediction(row)
        if now is not shown:
            self.show_prediction(now, model.review(row))
        else:
            self.update_review(model.review(row))

    def update_review(self, review: Review | None) -> None:
        p = self._prediction
        if p is None:
            self.info.setText("")
            self.bars.set_values({}, None, None)
            return
        self.bars.set_values(p.probabilities, p.label, review.label if review else None)
        lines = []
        if p.error:
            lines.append(f"<b style='color:#9C0006'>{escape(label_text(p), quote=False)}</b>")
            lines.append("A person cannot label an image that cannot be shown.")
        else:
            lines.append(f"Model: <b>{escape(label_text(p), quote=False)}</b> ({(p.confidence or 0):.1%}, "
                         f"margin {(p.margin or 0):.1%})")
            if p.needs_review:
                lines.append(f"<span style='color:#a60'>\u2691 flagged: {escape(p.review_reason, quote=False)}</span>")
            if p.ood_score is not None:
                lines.append(f"Unfamiliarity {p.ood_score:.2f} (above 1: unlike the training data)")
            if p.colour_score is not None:
                lines.append(f"Colour distance {p.colour_score:.2f} (above 1: colours unlike the training slides')")
        if review is not None:
            when = review.at.astimezone().strftime("%Y-%m-%d %H:%M")
            by = escape(review.by, quote=False)
            lines.append(f"Reviewed as <b>{escape(class_name(review.label), quote=False)}</b> by {by} at {when}")
        self.info.setText("<br>".join(lines))

    def _image_loaded(self, path: Path, image: QImage) -> None:
        if self._prediction is None or self._prediction.path != path:
            return
        self.view.set_image(image)
        self.image_shown.emit()
        if self.cam_toggle.isChecked():
            self._request_cam()

    def _image_failed(self, path: Path, message: str) -> None:
        if self._prediction is not None and self._prediction.path == path:
            self.view.set_image(None, f"cannot show this image:\n{message}")
            self.image_shown.emit()

    # -- Grad-CAM -----------------------------------------------------------------------------
    def _cam_toggled(self, on: bool) -> None:
        if not on:
            self.view.set_overlay(None)
            self.cam_status.setText("")
            return
        self._request_cam()

    def _cam_key(self) -> tuple | None:
        p = self._prediction
        if p is None or p.error is not None or p.label is None:
            return None
        return (p.path, p.label)

    def _request_cam(self) -> None:
        key = self._cam_key()
        if key is None or not self.view.has_image():
            self.view.set_overlay(None)
            self.cam_status.setText("" if key is None else "\u2026")
            return
        if self._cam_source is None:
            self.cam_status.setText("no model loaded yet")
            return
        if key in self._cam_cache:
            self._cam_cache.move_to_end(key)
            self._show_cam(key)
            return
        self.cam_status.setText("computing\u2026")
        if key in self._cam_busy:
            return
        self._cam_busy.add(key)
        source = self._cam_source
        submit(self._cam_pool, lambda: _compute_cam(source, key[0], key[1]),
               partial(self._cam_done, key), partial(self._cam_error, key))

    def _cam_done(self, key: tuple, result: tuple[QImage, QRectF, str]) -> None:
        self._cam_busy.discard(key)
        self._cam_cache[key] = result
        while len(self._cam_cache) > 30:
            self._cam_cache.popitem(last=False)
        if key == self._cam_key() and self.cam_toggle.isChecked():
            self._show_cam(key)

    def _cam_error(self, key: tuple, message: str) -> None:
        self._cam_busy.discard(key)
        if key == self._cam_key():
            self.cam_status.setText("Grad-CAM failed")
            self.cam_status.setToolTip(message)
        self.cam_failed.emit(message)

    def _show_cam(self, key: tuple) -> None:
        overlay, box, label = self._cam_cache[key]
        self.view.set_overlay(overlay, box)
        self.cam_status.setText(f"where it looked for {class_name(label)}")
        self.cam_shown.emit()


def _load_full(path: Path) -> QImage:
    from bcc_desk.images import open_image

    return pil_to_qimage(open_image(path))


def _compute_cam(source: CamSource, path: Path, label: str) -> tuple[QImage, QRectF, str]:
    """Pool thread: Grad-CAM of the model's label for one image, coloured."""
    from bcc_desk.gui.gradcam import gradcam
    from bcc_desk.images import open_image

    model, spec, classes = source()
    target = classes.index(label) if label in classes else None
    result = gradcam(model, spec, open_image(path), target)
    return colour_heatmap(result.heatmap), QRectF(*result.box), classes[result.target]
