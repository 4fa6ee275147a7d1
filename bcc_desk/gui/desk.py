"""The app's controller, without widgets (as napari's components beside its _qt): a folder's run
(a `ClassifyThread` over one `ClassifierProcess`), the watch of that folder (a `WatchThread`), the
export, and the `ReviewSession` they fill.  The window shows what its signals say and asks the
user what only a person can answer (`confirm`: may a model that is not validated run?)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, QThreadPool, Signal

from bcc_desk.classify_process import ClassifierProcess
from bcc_desk.gui.models import ModelStore
from bcc_desk.gui.settings import AppSettings
from bcc_desk.gui.worker import ClassifyThread, WatchThread, freeze_heap
from bcc_desk.options import RunSpec
from bcc_desk.prediction import Prediction
from bcc_desk.review import Export, ReviewSession

if TYPE_CHECKING:
    from bcc_desk.watch.site import WatchTiming


class Desk(QObject):
    """One folder at a time: classify it, watch it, export what was reviewed."""

    run_starting = Signal(object)
    """A run of this folder (Path) begins: the rows of another folder are gone."""
    prepared = Signal(int, str, str)
    """The run's images are counted (total), the model loaded (device), and what is built first."""
    classes_changed = Signal()
    """The model that ran names other classes than the one chosen said."""
    rows_arrived = Signal(object, object, bool)
    """New predictions (from the run or the watch), the older ones they replaced, and whether
    they are the folder's first rows."""
    device_changed = Signal(str)
    notice = Signal(str)
    """One line the user must read (a failed run, a bad slides.csv, a diverted report...)."""
    running_changed = Signal(bool)
    run_finished = Signal(bool, int, float)
    """A run ended: whether every image was classified, how many the run was to classify, seconds."""
    watch_changed = Signal()
    """The watch starts, stops or ended: the window's toggle follows `is_watching`/`watch_stopping`."""
    watch_starting = Signal(object, object, object)
    """(folder, report, ledger) of a watch that is loading its model."""
    watch_started = Signal(object, str, object)
    """(folder, device, report) of a watch now classifying what arrives."""
    watch_stop_asked = Signal()
    """The watch finishes the images in hand and writes its report, then ends."""
    watch_ended = Signal(object, bool)
    """A watch of this folder (Path) has ended and written its last report; True when it was the
    folder's watch (not one of a folder open before, finishing)."""

    def __init__(self, settings: AppSettings, spec: RunSpec, confirm: Callable[[], bool],
                 parent: QObject | None = None, engine: ClassifierProcess | None = None) -> None:
        """`engine`: a classifier process shared with other desks (the caller ends it); by
        default the desk starts its own and ends it on `shutdown`."""
        super().__init__(parent)
        self.settings = settings
        self.spec = spec
        """The model, device and options the next run and the watch use (`ModelPicker` sets it)."""
        self.confirm = confirm
        self.session = ReviewSession()
        """The rows, reviews and run record the window shows (and the export writes)."""
        self.store = ModelStore()  # Grad-CAM's models: the one use of torch in this process
        self.engine = engine or ClassifierProcess()
        """Where folders and the watch are classified: a process of its own, started by the first run."""
        self._owns_engine = engine is None
        self.watch_timing: WatchTiming | None = None
        """How the watch sees files arrive; None: `bcc watch`'s defaults (a file complete after
        2 s unchanged, the report rewritten after 1 s without a new result)."""
        self.export_pool = QThreadPool(self)
        self.export_pool.setMaxThreadCount(1)
        self._thread: ClassifyThread | None = None
        self._pending_root: Path | None = None
        self._completed = False
        self._total = 0
        self._started_at = 0.0
        self._watch: WatchThread | None = None
        # Watched when the app was last closed: watched again once it is opened and classified.
        self._resume_watch: Path | None = Path(settings.watched_folder) if settings.watched_folder else None

    @property
    def root(self) -> Path | None:
        return self.session.root

    # -- a run -------------------------------------------------------------------------------------
    def open_folder(self, root: Path) -> None:
        """Classify every image under `root` (resolved, existing); see `MainWindow.open_folder`."""
        if not self.confirm():
            return
        if self.is_watching():
            if root == self.root:  # the same folder again: watch it again once classified
                self._resume_watch = root
            else:
                self.settings.watched_folder = ""
            self.stop_watch()
        if self._thread is not None:
            self._pending_root = root
            self._thread.cancel()
            return
        self._start(root)

    def cancel(self) -> bool:
        """Stop the run (the images classified so far stay); False when none was going."""
        self._pending_root = None
        if self._thread is None:
            return False
        self._thread.cancel()
        return True

    def is_running(self) -> bool:
        return self._thread is not None

    def _start(self, root: Path) -> None:
        if not self.confirm():  # a run that waited for another, the model changed since
            return
        if problem := self.session.start(root):  # the same folder again keeps the reviews made so far
            self.notice.emit(problem)  # a bad slides.csv: the run goes on, without identities
        self.settings.add_recent_folder(root)
        self._completed = False
        self._total = 0
        self._started_at = time.monotonic()
        self.run_starting.emit(root)
        freeze_heap()  # torch, Qt and the window: long-lived, never worth a full GC pass again
        thread = ClassifyThread(root, self.spec, self.engine, parent=self)
        thread.prepared.connect(self._prepared)
        thread.batch.connect(self.add_rows)
        thread.failed.connect(self.notice.emit)
        thread.ended.connect(self._ended)
        thread.device_changed.connect(self._device_changed)
        thread.finished.connect(self._thread_finished)
        self._thread = thread
        self.running_changed.emit(True)
        thread.start()

    def _prepared(self, total: int, device: str, preparing: str) -> None:
        thread = self._thread
        assert thread is not None
        self._total = total
        info = self.session.run_info = thread.run_info  # what made these rows: the Run sheet says so
        assert info is not None  # set before `prepared`
        if info.classes != self.session.classes:
            self.session.classes = list(info.classes)
            self.classes_changed.emit()
        self.prepared.emit(total, device, preparing)

    def _device_changed(self, device: str) -> None:
        if self._thread is not None:
            self.session.run_info = self._thread.run_info
        self.device_changed.emit(device)

    def add_rows(self, predictions: list[Prediction]) -> None:
        """New rows, or new predictions for images already in the table (one row per image)."""
        first = len(self.session) == 0
        replaced = self.session.add(predictions)
        self.rows_arrived.emit(predictions, replaced, first)

    def _ended(self, completed: bool) -> None:
        self._completed = completed

    def _thread_finished(self) -> None:
        thread = self._thread
        self._thread = None
        if thread is not None:
            thread.wait()
            thread.deleteLater()
        self.session.finish(self._completed)
        self.running_changed.emit(False)
        completed = self._completed
        self.run_finished.emit(completed, self._total, time.monotonic() - self._started_at)
        if self._pending_root is not None:
            root, self._pending_root = self._pending_root, None
            self._start(root)
        elif self._resume_watch is not None and self._resume_watch == self.root:
            self._resume_watch = None
            if completed and self.root is not None and self.root.is_dir():
                self.start_watch()

    # -- the watch ---------------------------------------------------------------------------------
    def set_watching(self, on: bool) -> None:
        """See `MainWindow.set_watching`."""
        if not on:
            self._resume_watch = None
            self.settings.watched_folder = ""
            self.stop_watch()
            return
        if self.is_watching():
            return
        if self.root is None or not self.root.is_dir():
            self.watch_changed.emit()
            self.notice.emit("Open a folder first: only a folder can be watched")
            return
        if self._thread is not None:
            self._resume_watch = self.root
            return
        self.start_watch()

    def is_watching(self) -> bool:
        return self._watch is not None and not self._watch.stopping

    @property
    def watch_thread(self) -> WatchThread | None:
        """The watch's thread while one runs or finishes (None: no watch)."""
        return self._watch

    def watch_stopping(self) -> bool:
        return self._watch is not None and self._watch.stopping

    def start_watch(self) -> None:
        from bcc_desk.watch.site import WatchError, claim_watch

        root = self.root
        assert root is not None
        if not self.confirm():
            self.settings.watched_folder = ""
            self.watch_changed.emit()
            return
        old = self._watch
        if old is not None:  # still finishing (turned off a moment ago): it holds the lock
            old.stop()
            old.wait()
            self._watch = None
        try:
            site = claim_watch(root)  # at once: the per-user ledger in use by a bcc watch daemon, ...
        except WatchError as exc:
            self.settings.watched_folder = ""
            self.watch_changed.emit()
            self.notice.emit(f"Cannot watch {root}: {exc}")
            return
        thread = WatchThread(site, self.spec, self.engine, timing=self.watch_timing, parent=self)
        thread.started_watching.connect(self._watch_started)
        thread.batch.connect(self._watch_batch)
        thread.failed.connect(self._watch_failed)
        thread.ended.connect(self._watch_ended)
        self._watch = thread
        self.settings.watched_folder = str(root)
        self.watch_starting.emit(root, site.out, site.state)
        self.watch_changed.emit()
        thread.start()

    def stop_watch(self) -> None:
        """Ask the watch to end; it finishes the images in hand and writes its report on its own
        thread, and `_watch_ended` joins it."""
        thread = self._watch
        if thread is None or thread.stopping:
            return
        thread.stop()
        self.watch_stop_asked.emit()
        self.watch_changed.emit()

    def restart_watch(self) -> None:
        """The watch goes on with the model chosen now."""
        if self.is_watching():
            self.stop_watch()
            self.start_watch()

    def _watch_started(self, device: str) -> None:
        thread = self._watch
        if thread is None or thread.stopping:
            return
        # From now on rows come from the watch's classifier (after a model switch: the new one).
        self.session.run_info = thread.run_info
        self.watch_started.emit(thread.root, device, thread.site.out)

    def _watch_batch(self, root: Path, predictions: list[Prediction]) -> None:
        if root != self.root:  # a watch of the folder open before, finishing its last images
            return
        self.add_rows(predictions)

    def _watch_failed(self, message: str) -> None:
        self.settings.watched_folder = ""
        self.notice.emit(f"The watch stopped: {message}")

    def _watch_ended(self, thread: WatchThread) -> None:
        thread.wait()
        thread.deleteLater()
        current = self._watch is thread
        if current:
            self._watch = None
        self.watch_ended.emit(thread.root, current)
        if current:
            self.watch_changed.emit()

    # -- export ------------------------------------------------------------------------------------
    def default_report_path(self) -> Path | None:
        if self.root is None:
            return None
        folder = self.root if self.root.is_dir() else self.root.parent
        if self._watch is not None and self._watch.root == folder:
            return folder / "bcc-review.xlsx"  # bcc-report.xlsx is the watch's, rewritten from its ledger
        return folder / "bcc-report.xlsx"

    def check_export_target(self, out: Path) -> None:
        """The watch rewrites its report from its ledger: reviews exported over it would be lost."""
        if self._watch is not None and out.resolve() == self._watch.site.out:
            raise ValueError(f"{out.name} is the watch's report, rewritten from its ledger as images arrive: "
                             "export the reviews to another file")

    def snapshot(self) -> Export:
        """What an export writes now: the session's snapshot, with the lab's name (File \u203a Lab
        name) for the PDF's header.  Raises ValueError when there is nothing to export."""
        export = self.session.snapshot()
        return replace(export, lab=replace(export.lab, lab_name=self.settings.lab_name))

    def export_report(self, path: Path | str | None = None) -> Path:
        """See `MainWindow.export_report`."""
        out = Path(path) if path is not None else self.default_report_path()
        if out is None:
            raise ValueError("nothing to export: open a folder first")
        self.check_export_target(out)
        snapshot = self.snapshot()
        written, diverted = snapshot.write(out)
        self.session.exported(snapshot)  # wherever it went, a file holds the reviews
        if diverted:
            self.notice.emit(f"{diverted}; the report was written to {written} instead")
        return written

    # -- the end -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the run, the watch and the classifier process (the folder watched now is watched
        again when next opened)."""
        self._pending_root = None
        thread = self._thread
        if thread is not None:
            thread.cancel()
            thread.wait()
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()
            watch.wait()  # the report is finalised by the watcher before its thread ends
            self.watch_changed.emit()
        if self._owns_engine:
            self.engine.close()
        self.export_pool.waitForDone()
