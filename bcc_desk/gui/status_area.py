"""The status bar's permanent widgets: the watch, the counts, a run's progress with its Cancel
button, the model in use and the device, and the messages a watch's steps leave in the bar.
What they say comes from the window and the Desk's signals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QStatusBar

from bcc_desk.bundle_meta import BundleMeta, verdict_text
from bcc_desk.gui.palette import ERROR_TEXT
from bcc_desk.slides import SlideCount


class StatusArea:
    """Labels, progress and Cancel, added to `bar` in the order a reader scans them."""

    def __init__(self, bar: QStatusBar, cancel: Callable[[], None]) -> None:
        self.bar = bar
        self.counts_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setFormat("%v / %m")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop classifying; the images done so far stay (Esc)")
        self.cancel_button.clicked.connect(cancel)
        self.device_label = QLabel("")
        self.model_label = QLabel("")
        self.watch_label = QLabel("")
        self.watch_label.setVisible(False)
        for widget in (self.watch_label, self.counts_label, self.progress, self.cancel_button, self.model_label,
                       self.device_label):
            bar.addPermanentWidget(widget)

    def show_model(self, metas: list[BundleMeta], unvalidated: list[BundleMeta], tta: bool) -> None:
        """The model in use: its name(s), NOT VALIDATED in red with the reasons, TTA, ensemble."""
        if not metas:
            self.model_label.setText("no usable model")
        else:
            names = " + ".join(m.name for m in metas)
            extras = [x for x, on in (("NOT VALIDATED", bool(unvalidated)), ("TTA", tta), ("ensemble", len(metas) > 1)) if on]
            self.model_label.setText(f"model: {names}" + (f" ({', '.join(extras)})" if extras else ""))
        self.model_label.setStyleSheet(f"color: {ERROR_TEXT.name()}; font-weight: bold" if unvalidated else "")
        self.model_label.setToolTip("\n".join(f"{m.name}: {verdict_text(m)}" for m in unvalidated))

    def show_device(self, device: str) -> None:
        self.device_label.setText(f"device: {device}")

    def show_counts(self, total: int, counts: SlideCount) -> None:
        # Unreadable images are flagged too (a person must look), as the CLI counts them.
        self.counts_label.setText(f"{total} images \u00b7 {counts.flagged} flagged ({counts.unreadable} unreadable) "
                                  f"\u00b7 {counts.reviewed} reviewed")

    def show_running(self, running: bool) -> None:
        self.progress.setVisible(running)
        self.cancel_button.setVisible(running)

    def show_progress(self, done: int, total: int | None = None) -> None:
        """`done` of `total` (None: the same total; 0 with total 0: busy, not yet counted)."""
        if total is not None:
            self.progress.setRange(0, total)
        self.progress.setValue(done)

    def show_watch(self, text: str | None, tooltip: str | None = None) -> None:
        """The watch's state in words (None: no watch, the label hidden)."""
        self.watch_label.setVisible(text is not None)
        if text is not None:
            self.watch_label.setText(text)
        if tooltip is not None:
            self.watch_label.setToolTip(tooltip)

    def watch_tooltip(self, root: Path, report: Path, ledger: Path) -> str:
        return f"Folder: {root}\nReport: {report}\nLedger: {ledger}"

    # A run's and a watch's steps (the Desk's signals)
    def run_starting(self, root: Path) -> None:
        self.show_progress(0, 0)  # busy until the images are counted
        self.bar.showMessage(f"Loading the model and looking for images in {root}\u2026")

    def prepared(self, total: int, device: str, preparing: str) -> None:
        self.show_progress(0, total)
        self.show_device(device)
        note = f"; {preparing} first" if preparing else ""
        self.bar.showMessage(f"Classifying {total} images on {device}{note}\u2026")

    def run_finished(self, completed: bool, done: int, total: int, seconds: float) -> None:
        if completed:
            self.bar.showMessage(f"Classified {done} images in {seconds:.0f} s.", 15000)
        elif done:
            self.bar.showMessage(f"Stopped after {done} of {total} images.", 15000)

    def watch_starting(self, root: Path, report: Path, ledger: Path) -> None:
        self.show_watch("Watching: starting\u2026", self.watch_tooltip(root, report, ledger))
        self.bar.showMessage(f"Loading the model to watch {root}\u2026")

    def watch_started(self, root: Path, device: str, report: Path) -> None:
        self.show_watch("\u25c9 Watching")
        self.bar.showMessage(f"Watching {root} on {device}: new images are classified as they arrive; report {report}", 15000)

    def watch_stopping(self) -> None:
        self.show_watch("Watching: stopping\u2026")
        self.bar.showMessage("Stopping the watch (the images in hand, then the report)\u2026")

    def watch_ended(self, root: Path, current: bool) -> None:
        if current:
            self.show_watch(None)
            if not self.bar.currentMessage().startswith("The watch stopped"):
                self.bar.showMessage(f"Stopped watching {root}.", 15000)
