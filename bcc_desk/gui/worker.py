"""Classification off the UI thread.

`ClassifyThread` finds the images, loads the model (through the shared `ModelStore`) and runs
the core `Classifier`.  Predictions are handed to the UI in batches at most every
`emit_interval` seconds, so a fast GPU classifying thousands of images a minute cannot flood the
event loop with one signal per image.  Cancelling closes the classifier's generator, which also
stops its image decoders; the images done so far stay in the table.

`WatchThread` runs `bcc watch`'s own `Watcher` (ledger, settle rules, report) on the open folder
and hands each batch it records to the UI.
"""

from __future__ import annotations

import gc
import logging
import shlex
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, QThread, Signal

from bcc_desk.gui.jobs import one_line
from bcc_desk.gui.models import ModelChoice, ModelStore

if TYPE_CHECKING:
    from bcc_desk.report import RunInfo
    from bcc_desk.watch import Watcher, WatchSite


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
        self.run_info: RunInfo | None = None
        """The Run sheet's record of this run, from the classifier that makes it (set before `prepared`)."""

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> None:  # the thread's body
        completed = False
        try:
            completed = self._classify()
        except Exception as exc:  # noqa: BLE001 - a bad bundle/device/folder is a message, not a crash
            self.failed.emit(one_line(exc))
        self.ended.emit(completed)

    def _classify(self) -> bool:
        from bcc_desk.images import discover_images
        from bcc_desk.report import run_info

        root = self.root.resolve()
        folder = root if root.is_dir() else root.parent  # the CLI's rule: slides relative to it
        paths = discover_images(root)
        if self._cancel.is_set():
            return False
        if not paths:
            self.failed.emit(f"no images found under {root} (looked for .jpg .jpeg .png .tif .tiff .bmp)")
            return False
        classifier = self.store.classifier(self.choice)
        # The first batch of a large run waits for torch.compile (seconds to ~20 s on 2 cores);
        # the classifier's own rule says whether it will.
        compiling = classifier.preparation(len(paths)) is not None
        if compiling:
            _import_compiler(int8=bool(getattr(classifier, "int8", False)))
        freeze_heap()
        self.device_label = classifier.device_label
        # What the report's Run sheet records, read here so the UI thread never touches the store.
        self.run_info = run_info(classifier, root=folder, command=shlex.join(["bcc-desk", str(self.root)]))
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
                        self.run_info = replace(self.run_info, device=self.device_label)
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


class WatchThread(QThread):
    """A watch of one folder, `bcc watch`'s `Watcher` on `site` (claimed, its lock held, by the
    caller), until `stop`.  The network runs uncompiled: images arrive one at a time, and a
    compiled network costs a whole batch per call.  The lock is released when the thread ends."""

    started_watching = Signal(str)
    """the device label: the model is loaded and the watch is starting"""
    batch = Signal(object, object)
    """(the watched folder, list[Prediction]): outcomes just recorded in the ledger"""
    failed = Signal(str)
    """a one-line reason the watch could not start or stopped"""
    ended = Signal(object)
    """this thread, as its last act (the UI thread then joins it)"""

    def __init__(
        self,
        site: WatchSite,
        choice: ModelChoice,
        store: ModelStore,
        *,
        settle: float = 2.0,
        quiet: float = 1.0,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.site = site
        self.root = site.root
        self.choice = replace(choice, compile=False)
        self.store = store
        self.settle, self.quiet = settle, quiet
        self.stopping = False
        self._lock = threading.Lock()
        self._watcher: Watcher | None = None
        self.run_info: RunInfo | None = None
        """The watch's Run sheet record (its classifier's), set before `started_watching`."""

    def stop(self) -> None:
        """Ask the watch to end: it finishes the batch in hand and writes the report."""
        with self._lock:
            self.stopping = True
            watcher = self._watcher
        if watcher is not None:
            watcher.stop()

    def run(self) -> None:  # the thread's body
        from bcc_desk.watch import log_file, log_to_file, make_watcher

        logger = logging.getLogger("bcc_desk")
        level = logger.level
        handler = None
        try:
            classifier = self.store.classifier(self.choice)
            freeze_heap()
            with self._lock:
                if self.stopping:
                    return
                handler = log_to_file(log_file(self.site.state))  # beside the ledger, as bcc watch does
                self._watcher = make_watcher(
                    self.site, classifier, command=shlex.join(["bcc-desk", str(self.root)]), mode="bcc-desk",
                    settle=self.settle, quiet=self.quiet, on_predictions=self._recorded,
                )
            self.run_info = self._watcher.report.run
            self.started_watching.emit(classifier.device_label)
            self._watcher.run()
        except Exception as exc:  # noqa: BLE001 - a bad bundle, a folder that cannot be watched: a message
            self.failed.emit(one_line(exc))
        finally:
            self.site.release()
            if handler is not None:
                logger.removeHandler(handler)
                handler.close()
                logger.setLevel(level)
            self.ended.emit(self)

    def _recorded(self, predictions: list) -> None:
        self.batch.emit(self.root, predictions)


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
