"""The model picker: which bundle (or bundles: an ensemble), on which device, with or without
test-time augmentation, and which review threshold.  A bundle its trainer did not find fit for use
is marked "not validated" (its reasons in the tooltip and the details); the window asks before it
runs one.

It reads only `bundle.json` (no weights), so browsing bundles is instant; the weights are
verified when a folder is classified.
"""

from __future__ import annotations

from dataclasses import replace
from html import escape
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from bcc_desk.bundle_meta import BundleError, BundleMeta, describe, format_value, not_validated, read_meta, verdict_text
from bcc_desk.gui.palette import ERROR_TEXT
from bcc_desk.options import RunSpec
from bcc_desk.paths import DEFAULT_MODEL_DIR

_PATH_ROLE = Qt.ItemDataRole.UserRole + 1
NOT_VALIDATED_MARK = "(not validated)"
"""What a bundle's list entry says when its trainer did not find it fit for use."""


def describe_html(meta: BundleMeta, folder: Path) -> str:
    """A bundle's metadata and recorded metrics as HTML (the dialog's details pane): the rows
    `bcc info` shows, the review threshold and metrics as percentages like the threshold box."""
    rows = [("folder", str(folder)), *describe(meta, percent=True)]
    metrics = [(k, format_value(v, percent=True)) for k, v in meta.metrics.items()]
    html = [f"<h3>{escape(meta.name)}</h3>"]
    if not_validated([meta]):
        html.append(f"<p style='color:{ERROR_TEXT.name()}'><b>{escape(verdict_text(meta))}</b><br>Its labels cannot be "
                    "trusted; the app asks before it runs it, and every page of its reports says so.</p>")
    html.append("<table cellspacing='2'>")
    html += [f"<tr><td><b>{escape(k)}</b></td><td>{escape(v)}</td></tr>" for k, v in rows]
    html.append("</table><h4>Metrics (val_: the validation split, test_: the test split)</h4><table cellspacing='2'>")
    html += [f"<tr><td><b>{escape(k)}</b></td><td align='right'>{escape(v)}</td></tr>" for k, v in metrics]
    if not metrics:
        html.append("<tr><td>none recorded</td></tr>")
    html.append("</table>")
    return "".join(html)


class ModelDialog(QDialog):
    """Tick one bundle, or several for an ensemble; the details show the selected one."""

    def __init__(self, spec: RunSpec, known: list[Path], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Model")
        self._initial = spec
        options = spec.options
        self.resize(760, 520)
        self.list = QListWidget()
        self.list.currentItemChanged.connect(self._show_details)
        self.details = QTextBrowser()
        add = QPushButton("Add bundle folder\u2026")
        add.clicked.connect(self._browse)
        chosen = {Path(d).resolve() for d in spec.model_dirs}
        folders: list[Path] = []
        for folder in [DEFAULT_MODEL_DIR, *known, *spec.model_dirs]:
            folder = Path(folder).resolve()
            if folder not in folders:
                folders.append(folder)
        for folder in folders:
            self.add_bundle(folder, checked=folder in chosen)

        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device.setEditable(True)  # cuda:1 and the like
        self.device.setCurrentText(options.device)
        self.tta = QCheckBox("Test-time augmentation (average of 8 rotations and mirror images; 8x slower)")
        self.tta.setChecked(options.tta)
        self.own_threshold = QCheckBox("Use the model's review threshold")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 100.0)
        self.threshold.setSuffix(" %")
        self.threshold.setDecimals(1)
        self.own_threshold.toggled.connect(lambda on: self.threshold.setEnabled(not on))
        self.own_threshold.setChecked(options.review_threshold is None)
        if options.review_threshold is not None:
            self.threshold.setValue(options.review_threshold * 100)
        self.threshold.setEnabled(options.review_threshold is not None)
        self.slide_consensus = QCheckBox("Flag an image that disagrees with most of its slide "
                                         "(each folder one patient's slide; untick where a folder mixes patients)")
        self.slide_consensus.setChecked(options.slide_consensus)

        form = QFormLayout()
        form.addRow("Device", self.device)
        form.addRow("", self.tta)
        threshold_row = QHBoxLayout()
        threshold_row.addWidget(self.own_threshold)
        threshold_row.addWidget(self.threshold)
        form.addRow("Flag below", threshold_row)
        form.addRow("", self.slide_consensus)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        self.message = QTextBrowser()
        self.message.setMaximumHeight(40)
        self.message.setVisible(False)

        left = QVBoxLayout()
        left.addWidget(self.list)
        left.addWidget(add)
        top = QHBoxLayout()
        top.addLayout(left, 2)
        top.addWidget(self.details, 3)
        layout = QVBoxLayout(self)
        layout.addLayout(top, 1)
        layout.addLayout(form)
        layout.addWidget(self.message)
        layout.addWidget(buttons)
        if self.list.count():
            self.list.setCurrentRow(0)

    def add_bundle(self, folder: Path, checked: bool = False) -> bool:
        """List a bundle folder (False, and a message, when it is not a readable bundle)."""
        try:
            meta = read_meta(folder)
        except BundleError as exc:
            self._say(str(exc))
            return False
        unvalidated = bool(not_validated([meta]))
        mark = f"  {NOT_VALIDATED_MARK}" if unvalidated else ""
        item = QListWidgetItem(f"{meta.name}  ({meta.arch}, {folder.name}){mark}")
        item.setData(_PATH_ROLE, str(folder))
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
        item.setToolTip(f"{folder}\nverdict: {verdict_text(meta)}" if unvalidated else str(folder))
        if unvalidated:
            item.setForeground(ERROR_TEXT)
        self.list.addItem(item)
        self.list.setCurrentItem(item)
        return True

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model bundle folder")
        if folder:
            self.add_bundle(Path(folder).resolve(), checked=False)

    def _show_details(self, item: QListWidgetItem | None, _previous=None) -> None:
        if item is None:
            self.details.clear()
            return
        folder = Path(item.data(_PATH_ROLE))
        try:
            self.details.setHtml(describe_html(read_meta(folder), folder))
        except BundleError as exc:
            self.details.setPlainText(str(exc))

    def _say(self, text: str) -> None:
        self.message.setPlainText(text)
        self.message.setVisible(True)

    def checked_folders(self) -> list[Path]:
        return [
            Path(self.list.item(i).data(_PATH_ROLE))
            for i in range(self.list.count())
            if self.list.item(i).checkState() == Qt.CheckState.Checked
        ]

    def listed_folders(self) -> list[Path]:
        return [Path(self.list.item(i).data(_PATH_ROLE)) for i in range(self.list.count())]

    def spec(self) -> RunSpec:
        """The model and options as set now (the others as they were); a confirmation to run
        unvalidated bundles carries over only while the same bundles stay ticked."""
        spec = RunSpec(tuple(self.checked_folders()), replace(
            self._initial.options,
            device=self.device.currentText().strip() or "auto",
            tta=self.tta.isChecked(),
            review_threshold=None if self.own_threshold.isChecked() else self.threshold.value() / 100,
            slide_consensus=self.slide_consensus.isChecked(),
        ))
        return spec.with_options(allow_unvalidated=self._initial.options.allow_unvalidated and spec.same_bundles(self._initial))

    def _accept(self) -> None:
        folders = self.checked_folders()
        if not folders:
            self._say("Tick at least one model (several make an ensemble).")
            return
        try:
            metas = [read_meta(f) for f in folders]
        except BundleError as exc:
            self._say(str(exc))
            return
        if any(m.classes != metas[0].classes for m in metas[1:]):
            self._say("The ticked models have different classes; an ensemble needs the same classes.")
            return
        self.accept()
