"""Classification off the UI thread.

`ClassifyThread` finds the images and hands them to the window's `ClassifierProcess`: the
network runs in a process of its own (int8 included, as `bcc classify`), so it can never hold
this process's GIL and freeze the window.  Predictions come back in batches at most every 0.25 s:
a fast GPU cannot flood the event loop with one signal per image, and each batch's repaint costs
this process's CPU, which on a small machine the classifier process would otherwise have had.
Cancelling ends the thread at once; the images done so far stay in the table, and a crash of the
process is one message.

`WatchThread` runs `bcc watch`'s own `Watcher` (ledger, settle rules, report) on the open folder
and hands each batch it records to the UI; its network is the same classifier process's (a
`ChildClassifier`), taking turns with the folder's runs, so this process never imports torch.
"""

from __future__ import annotations

import gc
import logging
import shlex
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, QThread, Signal

from bcc_desk.messages import one_line
from bcc_desk.options import RunSpec

if TYPE_CHECKING:
    from bcc_desk.classify_process import ClassifierProcess
    from bcc_desk.run_record import RunInfo
    from bcc_desk.watch.site import WatchSite, WatchTiming
    from bcc_desk.watch.watcher import Watcher


class ClassifyThread(QThread):
    """One run over one folder: it finds the images and waits on the classifier process (which
    holds the network) for their predictions.  Signals are queued to the UI thread (this object
    lives there)."""

    prepared = Signal(int, str, str)
    """(images found, device label, what happens before the first batch or '')"""
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
        spec: RunSpec,
        engine: ClassifierProcess,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.root = Path(root)
        self.spec = spec
        self.engine = engine
        self._cancel = threading.Event()
        self.device_label = ""
        self.run_info: RunInfo | None = None
        """The Run sheet's record of this run, from the classifier that makes it (set before `prepared`)."""

    def cancel(self) -> None:
        """Stop now: the thread ends within a moment, the process drops the rest of the run."""
        self._cancel.set()

    def run(self) -> None:  # the thread's body
        completed = False
        try:
            completed = self._classify()
        except Exception as exc:  # noqa: BLE001 - a bad bundle/device/folder is a message, not a crash
            self.failed.emit(one_line(exc))
        self.ended.emit(completed)

    def _classify(self) -> bool:
        from bcc_desk.classify_process import ClassifierCrashed, Prepared
        from bcc_desk.images import discover_images

        root = self.root.resolve()
        folder = root if root.is_dir() else root.parent  # the CLI's rule: slides relative to it
        paths = discover_images(root)
        if self._cancel.is_set():
            return False
        if not paths:
            self.failed.emit(f"no images found under {root} (looked for .jpg .jpeg .png .tif .tiff .bmp)")
            return False
        done = 0
        try:
            for message in self.engine.classify(self.spec, paths, folder,
                                                command=shlex.join(["bcc-desk", str(self.root)]),
                                                stop=self._cancel.is_set):
                if isinstance(message, Prepared):
                    self.device_label = message.device
                    self.run_info = message.run_info
                    self.prepared.emit(message.total, message.device, message.preparing or "")
                    continue
                if message.device != self.device_label:  # e.g. int8 took over once compiled
                    self.device_label = message.device
                    assert self.run_info is not None
                    self.run_info = replace(self.run_info, device=message.device)
                    self.device_changed.emit(message.device)
                done += len(message.predictions)
                self.batch.emit(message.predictions)
        except ClassifierCrashed as exc:
            raise ClassifierCrashed(f"{exc}; the {done} images classified before it are kept") from None
        return not self._cancel.is_set()


class WatchThread(QThread):
    """A watch of one folder, `bcc watch`'s `Watcher` on `site` (claimed, its lock held, by the
    caller), until `stop`, classifying in `engine`'s process.  The network runs uncompiled: images
    arrive one at a time, and a compiled network costs a whole batch per call.  The lock is
    released when the thread ends."""

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
        spec: RunSpec,
        engine: ClassifierProcess,
        *,
        timing: WatchTiming | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.site = site
        self.root = site.root
        self.spec = spec.with_options(compile=False)
        self.engine = engine
        self.timing = timing  # None: the daemon's defaults
        self.stopping = False
        self._lock = threading.Lock()
        self._stop = threading.Event()  # a call waiting for the classifier's turn ends early
        self._watcher: Watcher | None = None
        self.run_info: RunInfo | None = None
        """The watch's Run sheet record (its classifier's), set before `started_watching`."""

    def stop(self) -> None:
        """Ask the watch to end: it finishes the batch in hand and writes the report."""
        with self._lock:
            self.stopping = True
            watcher = self._watcher
            self._stop.set()
        if watcher is not None:
            watcher.stop()

    def run(self) -> None:  # the thread's body
        from bcc_desk.classify_process import ChildClassifier
        from bcc_desk.watch.site import WatchTiming, log_file, log_to_file
        from bcc_desk.watch.watcher import make_watcher

        logger = logging.getLogger("bcc_desk")
        level = logger.level
        handler = None
        try:
            command = shlex.join(["bcc-desk", str(self.root)])
            classifier = ChildClassifier(self.engine, self.spec, self.root, command=command, stop=self._stop.is_set)
            with self._lock:
                if self.stopping:
                    return
                handler = log_to_file(log_file(self.site.state))  # beside the ledger, as bcc watch does
                self._watcher = make_watcher(
                    self.site, classifier, classifier.run_info(root=self.root, command=command), mode="bcc-desk",
                    timing=self.timing or WatchTiming(), on_predictions=self._recorded,
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
