"""Classification off the UI thread.

`ClassifyThread` finds the images, loads the model (through the shared `ModelStore`) and runs
the core `Classifier`.  Predictions are handed to the UI in batches at most every
`emit_interval` seconds, so a fast GPU classifying thousands of images a minute cannot flood the
event loop with one signal per image.  Cancelling closes the classifier's generator, which also
stops its image decoders; the images done so far stay in the table.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

from PySide6.QtCore import QObject, QThread, Signal

from bcc_desk.gui.jobs import one_line
from bcc_desk.gui.models import ModelChoice, ModelStore


class ClassifyThread(QThread):
    """One run over one folder.  Signals are queued to the UI thread (this object lives there)."""

    prepared = Signal(int, str, bool)
    """(images found, device label, whether the network is being compiled first)"""
    batch = Signal(object)
    """list[Prediction], in discovery order"""
    failed = Signal(str)
    """a one-line reason the run could not start or stopped"""
    ended = Signal(bool)
    """True when every image was classified; False when cancelled or failed"""
    device_changed = Signal(str)
    """the device label once the first batch has run (compiling may switch to int8)"""

    def __init__(
        self,
        root: Path,
        choice: ModelChoice,
        store: ModelStore,
        emit_interval: float = 0.1,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.root = Path(root)
        self.choice = choice
        self.store = store
        self.emit_interval = emit_interval
        self._cancel = threading.Event()
        self.device_label = ""
        self.classes: list[str] = []
        self.review_threshold = 0.0
        self.models: list[tuple[str, str]] = []
        self.ood_check = "off"

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def run(self) -> None:  # the thread's body
        completed = False
        try:
            completed = self._classify()
        except Exception as exc:  # noqa: BLE001 - a bad bundle/device/folder is a message, not a crash
            self.failed.emit(one_line(exc))
        self.ended.emit(completed)

    def _classify(self) -> bool:
        from bcc_desk.classifier import COMPILE_MIN_IMAGES
        from bcc_desk.images import discover_images

        root = self.root.resolve()
        folder = root if root.is_dir() else root.parent  # the CLI's rule: slides relative to it
        paths = discover_images(root)
        if self._cancel.is_set():
            return False
        if not paths:
            self.failed.emit(f"no images found under {root} (looked for .jpg .jpeg .png .tif .tiff .bmp)")
            return False
        classifier = self.store.classifier(self.choice)
        # The first batch of a large run waits for torch.compile (seconds to ~20 s on 2 cores).
        compiling = bool(classifier.compile or (classifier.compile is None and len(paths) >= COMPILE_MIN_IMAGES))
        if compiling:
            _import_compiler(int8=bool(getattr(classifier, "int8", False)))
        freeze_heap()
        self.device_label = classifier.device_label
        self.classes = list(classifier.classes)
        self.review_threshold = classifier.review_threshold
        # What the report's Run sheet records, read here so the UI thread never touches the store.
        self.models = [(b.name, b.sha256) for b in classifier.bundles]
        with_ood = sum(b.meta.ood is not None for b in classifier.bundles)
        self.ood_check = "on" if with_ood == len(classifier.bundles) else ("off" if not with_ood else "partly")
        self.prepared.emit(len(paths), self.device_label, compiling)
        if self._cancel.is_set():
            return False
        pending: list = []
        last = time.monotonic()
        first = True
        predictions = classifier.predict_paths(paths, folder)
        try:
            for prediction in predictions:
                if first:  # the network is compiled (or quantised) by now
                    first = False
                    freeze_heap()
                    if classifier.device_label != self.device_label:  # e.g. int8 was switched on
                        self.device_label = classifier.device_label
                        self.device_changed.emit(self.device_label)
                pending.append(prediction)
                if self._cancel.is_set():
                    break
                now = time.monotonic()
                if now - last >= self.emit_interval:
                    self.batch.emit(pending)
                    pending = []
                    last = now
        finally:
            predictions.close()  # stops the decoding threads when cancelled
        if pending:
            self.batch.emit(pending)
        return not self._cancel.is_set()


def freeze_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach.

    torch, timm, the network and torch.compile leave a million long-lived objects; each full
    collection walked them all and held the GIL for 250-800 ms, the UI thread's longest stalls
    (measured with gc.callbacks on the 2-core machine).  Frozen, they are skipped: the pauses
    while classifying fell under 160 ms.  Objects freed by reference counting are unaffected."""
    gc.freeze()


def _import_compiler(int8: bool) -> None:
    """Load torch.compile's machinery (dynamo, inductor, export, sympy) before `freeze_heap`, so
    its several hundred thousand long-lived objects are frozen too rather than walked by every
    full collection while the network compiles."""
    import importlib

    names = ["sympy", "torch._dynamo", "torch._inductor.compile_fx", "torch.export"]
    if int8:  # the core's static int8 path quantises with torchao's PT2E flow first
        names.append("torchao.quantization.pt2e.quantize_pt2e")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # an older or trimmed torch: compiling will say so itself
            pass
