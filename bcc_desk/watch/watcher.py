"""The watch's work loop (`Watcher`): events in, settled files classified in batches, each outcome
committed to the ledger; `make_watcher` builds one for a claimed `WatchSite`."""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from watchdog.events import FileSystemEvent
from watchdog.observers.api import BaseObserver

from bcc_desk.files import file_sha256
from bcc_desk.images import discover_images, is_candidate
from bcc_desk.paths import SAMPLES_DIR
from bcc_desk.prediction import Prediction
from bcc_desk.run_record import RunInfo
from bcc_desk.watch.engine import WatchEngine
from bcc_desk.watch.ledger import DONE, VANISHED, Ledger, Row, storage_fault
from bcc_desk.watch.observer import EVENTS, EventQueue, folder_identity, make_observer
from bcc_desk.watch.report_writer import ReportWriter
from bcc_desk.watch.settle import COMPLETE, READ_RETRIES, SEEN, WRITING, Settler
from bcc_desk.watch.site import WatchError, WatchSite, WatchTiming

log = logging.getLogger(__name__)


HEALTH_EVERY = 1.0
"""Seconds between checks that the observer is alive and ROOT is still the same folder."""
PAUSE_FIRST, PAUSE_MAX = 1.0, 60.0
"""Back-off of a watch whose ledger cannot be written (a full disk): the first retry, the longest wait."""
RESCAN_EVERY = 600.0
"""Seconds between full reconciliations: a safety net for events the kernel or share dropped."""
MAX_CALL = 256
"""Most images handed to one classifier call (the rest wait for the next loop turn): batches
flow through a burst, and new events are still looked at every few seconds."""
MAX_EVENTS = 20_000
"""Most events taken per loop turn, so that a never-ending stream cannot starve the work."""


def make_watcher(
    site: WatchSite,
    classifier: WatchEngine,
    record: RunInfo,
    *,
    mode: str = "bcc watch",
    single: WatchEngine | None = None,
    timing: WatchTiming = WatchTiming(),
    on_predictions: Callable[[list[Prediction]], None] | None = None,
    pdf: bool = False,
    lab_name: str = "",
) -> Watcher:
    """The Watcher of `site`, its Run sheet saying what runs (`record`: the classifier's, with the
    command that started it), who started it (`mode`), how it watches and where its ledger is.  Raises LedgerError when the
    state file cannot be used.  `pdf`: keep a PDF report beside the report too; `lab_name` heads it."""
    observer = f"polling every {timing.interval:g} s" if timing.polling else "native (system events)"
    run = replace(record, extra={**record.extra, "mode": mode, "observer": observer,
                                 "settle time": f"{timing.settle:g} s", "ledger": str(site.state)})
    watcher = Watcher(site.root, site.out, classifier, site.state, run, single=single, timing=timing,
                      on_predictions=on_predictions)
    watcher.report.lab_name = lab_name
    if pdf and site.out.suffix.lower() != ".pdf":
        watcher.report.pdf = site.out.with_suffix(".pdf")
    return watcher


class Watcher:
    """Watch `root`, classify what lands there into the ledger at `state`, keep `out` written.

    `classifier` is a ready `Classifier`; `run` blocks until `stop` is called (from another
    thread or a signal handler), then finishes the batch in hand and writes the report.
    `single`, when `classifier` compiles, is the same model uncompiled, for calls of fewer than
    half a batch: a compiled network has one batch shape, so one image would cost a whole batch
    (8x the work on a CPU) where a camera sends images one at a time.

    `on_predictions`, when given, is called on the watch's thread with each batch of outcomes
    just committed to the ledger (new images, changed ones, copies given a stored answer, read
    errors after their last retry): how the desktop app shows them as they come.  It should be
    quick; an exception in it is logged, and the watch goes on."""

    def __init__(
        self,
        root: Path,
        out: Path,
        classifier: WatchEngine,
        state: Path,
        run_info: RunInfo,
        *,
        single: WatchEngine | None = None,
        timing: WatchTiming = WatchTiming(),
        on_predictions: Callable[[list[Prediction]], None] | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.out = Path(out)
        self.classifier = classifier
        self.single = single
        self.state = Path(state)
        self.timing = timing
        self.ledger = Ledger(self.state, self.root)
        if self.ledger.damaged:
            log.warning("%s", self.ledger.damaged)
        self.settler: Settler[str] = Settler(timing.settle)
        self.report = ReportWriter(self.state, self.out, run_info, quiet=timing.quiet, review=classifier.review_policy.apply,
                                   root=self.root)
        self.on_predictions = on_predictions
        self._events = EventQueue()
        self._observer: BaseObserver | None = None
        self._close_events = False
        self._identity: tuple[int, int] | None = None
        self._stopping = False
        self._next_health = 0.0
        self._next_rescan = 0.0

    # -- life cycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask `run` to finish; safe from any thread and from a signal handler."""
        self._stopping = True
        self._events.q.put(None)

    def run(self) -> None:
        try:
            self._start_observer()  # first: whatever arrives from now on is queued, not missed
            kind = f"polling every {self.timing.interval:g} s" if self.timing.polling else "native"
            log.info("watching %s (%s observer, settle %g s); report %s; ledger %s (log beside it)",
                     self.root, kind, self.timing.settle, self.out, self.state)
            self._prepare()
            self._guarded(self._rescan)
            self.report.start()
            log.info("ready (%s)", self.classifier.device_label)
            while not self._stopping:
                self._guarded(self._step)
            log.info("stopping: the batch in hand is done, writing the report")
        finally:
            self._stop_observer()
            self.report.close(datetime.now(UTC))
            counts = self.ledger.counts()
            self.ledger.close()
            log.info("stopped; ledger: %s", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty")

    def _step(self) -> None:
        self._take_events(self._timeout())
        self._check_health()
        ready, gone = self.settler.ready(self._stat)
        for rel in gone:
            self._gone(rel)
        if ready and not self._stopping:
            self._classify(ready)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run `step`; a ledger its storage will not let us write pauses the watch until it does."""
        try:
            step()
        except sqlite3.OperationalError as exc:
            reason = storage_fault(exc)
            if reason is None:
                raise
            self._pause(reason)

    def _pause(self, reason: str) -> None:
        """Hold intake while the ledger cannot be written, trying again with back-off, and resume
        on our own once it can.  Nothing is lost meanwhile: an image whose outcome was not
        committed is still pending, and the reconcile that resumes finds whatever arrived."""
        paused, delay = time.monotonic(), PAUSE_FIRST
        log.warning("the ledger %s cannot be written (%s): intake paused until it can, trying again "
                    "every %g-%g s; images that arrive meanwhile wait in the folder", self.state, reason,
                    PAUSE_FIRST, PAUSE_MAX)
        while not self._stopping:
            until = time.monotonic() + delay
            while not self._stopping and time.monotonic() < until:
                time.sleep(0.2)  # not an Event: stop() runs in signal handlers, where a lock could deadlock
            if self._stopping:
                return
            try:
                self._rescan()
            except sqlite3.OperationalError as exc:
                if storage_fault(exc) is None:
                    raise
                delay = min(2 * delay, PAUSE_MAX)
                continue
            log.info("the ledger can be written again after %.0f s: intake resumed", time.monotonic() - paused)
            return

    def _prepare(self) -> None:
        """Compile the network now (when the classifier compiles: int8 where the model allows,
        as `bcc classify` does), and run one real image through each network, so that neither
        the compilation nor the first call's set-up falls on the first image a user waits for."""
        started = time.monotonic()
        if self.classifier.compile:
            log.info("compiling the network (seconds; about 20 s the first time on 2 cores)")
            for _ in self.classifier.predict_paths([], self.root):
                pass
        samples = sorted(SAMPLES_DIR.rglob("*.jpg")) if SAMPLES_DIR.is_dir() else []
        engines = [e for e in (self.classifier, self.single) if e is not None]
        for engine in engines if samples else []:
            for _ in engine.predict_paths(samples[:1], samples[0].parent):
                pass
        log.info("network ready in %.0f s", time.monotonic() - started)
        # The Run sheet says what really ran (compiling may have switched to int8).
        labels = dict.fromkeys(e.device_label for e in engines)
        device = self.classifier.device_label
        if len(labels) > 1 and self.single is not None:
            device += f"; calls under {self.classifier.batch_size // 2} images: {self.single.device_label}"
        self.report.run = replace(self.report.run, device=device)

    def _timeout(self) -> float:
        due = self.settler.next_due()
        return min(HEALTH_EVERY, due) if due is not None else HEALTH_EVERY

    def _start_observer(self) -> None:
        observer, self._close_events = make_observer(self.timing.polling, self.timing.interval)
        try:
            observer.schedule(self._events, str(self.root), recursive=True, event_filter=EVENTS)
            observer.start()
        except OSError as exc:
            hint = "; use --polling, or raise fs.inotify.max_user_watches" if not self.timing.polling else ""
            raise WatchError(f"cannot watch {self.root}: {exc.strerror or exc}{hint}") from None
        self._observer = observer
        self._identity = folder_identity(self.root)
        self._next_rescan = time.monotonic() + RESCAN_EVERY

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _check_health(self) -> None:
        """Restart a dead watch: the observer's thread ended (its folder was deleted) or ROOT is
        no longer the folder it watches (deleted and recreated, a share unmounted/remounted)."""
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + HEALTH_EVERY
        identity = folder_identity(self.root)
        obs = self._observer
        if obs is not None and identity == self._identity and obs.is_alive() and all(
            e.is_alive() for e in obs.emitters
        ):
            if now >= self._next_rescan:
                self._rescan()
                self._next_rescan = now + RESCAN_EVERY
            return
        if obs is not None:
            log.warning("lost the watch on %s (folder %s); restarting it", self.root,
                        "missing" if identity is None else "replaced or watcher stopped")
            self._stop_observer()
        if identity is None:
            return  # not back yet: look again in a second
        try:
            self._start_observer()
        except WatchError as exc:
            log.warning("%s; trying again", exc)
            return
        self._rescan()
        log.info("watching %s again", self.root)

    # -- what is where --------------------------------------------------------------------------
    def _rel(self, path: str | Path) -> str | None:
        """ROOT-relative key of an image path we care about, else None."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if not parts or any(p.startswith(".") for p in parts[:-1]) or not is_candidate(rel):
            return None
        return rel.as_posix()

    def _stat(self, rel: str) -> os.stat_result | None:
        """lstat of a regular file, else None: links and special files are not images here
        (a link could lead outside ROOT, a FIFO would block the reader)."""
        try:
            st = os.lstat(self.root / rel)
        except OSError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def _current(self, row: Row) -> bool:
        """Whether a row's outcome still stands (a read error does not depend on the model)."""
        if row.outcome == DONE:
            return row.model_sha256 == self.classifier.sha256
        return row.outcome is not None

    # -- events -----------------------------------------------------------------------------------
    def _take_events(self, timeout: float) -> None:
        try:
            event = self._events.q.get(timeout=timeout)
        except queue.Empty:
            return
        for _ in range(MAX_EVENTS):
            if event is not None:
                self._on_event(event)
            try:
                event = self._events.q.get_nowait()
            except queue.Empty:
                return

    def _on_event(self, ev: FileSystemEvent) -> None:
        src, dest = str(ev.src_path), str(getattr(ev, "dest_path", "") or "")
        kind = ev.event_type
        if ev.is_directory:
            if src and (kind == "deleted" or kind == "moved") and Path(src) != self.root:
                self._gone_folder(src)
            if kind == "created":
                self._scan_folder(src, SEEN)
            elif kind == "moved" and dest:
                self._scan_folder(dest, COMPLETE)
            return
        if kind == "moved":
            if src:
                self._gone(self._rel(src))
            if dest:
                self._note(dest, COMPLETE)
        elif kind == "deleted":
            self._gone(self._rel(src))
        elif kind == "closed":
            self._note(src, COMPLETE)
        elif kind == "modified":
            self._note(src, WRITING if self._close_events else SEEN)
        elif kind == "created":
            self._note(src, SEEN)

    def _note(self, path: str | Path, evidence: str, st: os.stat_result | None = None, scan: bool = False) -> None:
        rel = self._rel(path)
        if rel is None:
            return
        st = st or self._stat(rel)
        if st is None:
            return
        row = self.ledger.get(rel)
        # A scan or create that finds the file as recorded needs no work; a write or close does
        # (the same size and mtime tick can hide new content).
        if (scan or evidence == SEEN) and row is not None and row.matches(st) and self._current(row):
            if row.state == VANISHED and row.outcome is not None:  # not None: `_current`
                self.ledger.refresh(rel, st, row.outcome)
                self.report.changed()
            self.settler.forget(rel)
            return
        if self.settler.note(rel, st, evidence) and row is None:
            self.ledger.seen(rel, st)

    def _gone(self, rel: str | None) -> None:
        if rel is None:
            return
        self.settler.forget(rel)
        if self.ledger.vanish([rel]):
            log.info("gone: %s", rel)
            self.report.changed()

    def _gone_folder(self, folder: str) -> None:
        try:
            rel = Path(folder).relative_to(self.root).as_posix()
        except ValueError:
            return
        for key in self.settler.waiting():
            if str(key).startswith(rel + "/"):
                self.settler.forget(key)
        if gone := self.ledger.vanish_under(rel):
            log.info("gone: %d images under %s", len(gone), rel)
            self.report.changed()

    def _scan_folder(self, folder: str, evidence: str) -> None:
        """A folder created or moved in: its files may come without events of their own."""
        try:
            paths = discover_images(Path(folder))
        except OSError:
            return
        for path in paths:
            self._note(path, evidence, scan=True)

    def _rescan(self) -> None:
        """Reconcile ROOT with the ledger: the start-up (and safety-net) pass."""
        try:
            found = {rel: st for p in discover_images(self.root)
                     if (rel := self._rel(p)) is not None and (st := self._stat(rel)) is not None}
        except OSError as exc:
            log.warning("cannot scan %s (%s); will try again", self.root, exc)
            return
        rows = self.ledger.rows()
        gone = [rel for rel, row in rows.items() if row.state != VANISHED and rel not in found]
        for rel in self.settler.waiting():
            if rel not in found:
                self.settler.forget(rel)
        if self.ledger.vanish(gone):
            log.info("%d images recorded before are no longer under %s", len(gone), self.root)
            self.report.changed()
        settled_before = time.time() - self.timing.settle
        for rel, st in found.items():
            # Untouched for the settle time: complete, no need to wait again.
            self._note(self.root / rel, COMPLETE if st.st_mtime < settled_before else SEEN, st, scan=True)
        if len(self.settler):
            log.info("%d images to classify (new or changed)", len(self.settler))

    # -- work -------------------------------------------------------------------------------------
    def _classify(self, ready: list[tuple[str, os.stat_result]]) -> None:
        todo: list[tuple[str, os.stat_result, str | None]] = []
        copies: list[Prediction] = []
        for rel, st in ready[:MAX_CALL]:
            try:
                digest = file_sha256(self.root / rel)
            except FileNotFoundError:
                self._gone(rel)
                continue
            except OSError:
                digest = None  # the classifier's read will say why
            if digest is not None and self._known(rel, st, digest, copies):
                continue
            todo.append((rel, st, digest))
        self._publish(copies)
        if not todo:
            return
        log.debug("classifying %d images", len(todo))
        engine = self.single if self.single is not None and 2 * len(todo) < self.classifier.batch_size else self.classifier
        predictions = engine.predict_paths([self.root / rel for rel, _, _ in todo], self.root)
        recorded: list[Prediction] = []
        try:
            for n, ((rel, st, digest), p) in enumerate(zip(todo, predictions), start=1):
                if self._outcome(rel, st, digest, p):
                    recorded.append(p)
                if n % engine.batch_size == 0:
                    self._publish(recorded)  # batch by batch, not once per (up to MAX_CALL) call
                    recorded = []
                    # Stopping: finish the batch the network already computed, leave the rest pending.
                    if self._stopping:
                        break
        finally:
            predictions.close()
            self._publish(recorded)

    def _publish(self, predictions: list[Prediction]) -> None:
        """Hand outcomes already committed to the ledger to `on_predictions`."""
        if not predictions or self.on_predictions is None:
            return
        try:
            self.on_predictions(list(predictions))
        except Exception:  # a listener's bug must not end weeks of watching
            log.exception("the on_predictions listener failed; the watch goes on")

    def _known(self, rel: str, st: os.stat_result, digest: str, copies: list[Prediction]) -> bool:
        """Content this model already classified, here or at another path: reuse the answer
        (a copy's stored answer is added to `copies`)."""
        row = self.ledger.get(rel)
        if row is not None and row.sha256 == digest and row.outcome == DONE and self._current(row):
            self.ledger.refresh(rel, st, DONE)
        elif source := self.ledger.done_with_hash(digest, self.classifier.sha256):
            self.ledger.copy_outcome(source, rel, st, digest)
            log.info("same image as %s: %s", source, rel)
            if (copied := self.ledger.prediction(rel)) is not None:
                copies.append(copied)
        else:
            return False
        self.settler.forget(rel)
        self.report.changed()
        return True

    def _outcome(self, rel: str, st: os.stat_result, digest: str | None, p: Prediction) -> bool:
        """Commit `p` (or count a failed read); True when it is now the file's recorded outcome."""
        now = self._stat(rel)
        if now is None:
            self._gone(rel)
            return False
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.settler.note(rel, now, SEEN)  # changed while we read it: this answer is stale
            return False
        if p.ok:
            self.ledger.record(rel, st, digest, p)  # no digest: read, but not hashed (rare)
            self.settler.forget(rel)
            log.info("classified %s: %s %.1f%%%s", rel, p.label, 100 * (p.confidence or 0.0),
                     " (review)" if p.needs_review else "")
            self.report.changed()
            return True
        attempts = self.settler.retry(rel)
        if attempts > READ_RETRIES:
            self.ledger.record(rel, st, digest, p, attempts)
            self.settler.forget(rel)
            log.warning("cannot read %s after %d tries: %s", rel, attempts, p.error)
            self.report.changed()
            return True
        self.ledger.failed_read(rel, attempts)
        log.info("cannot read %s yet (%s); trying again", rel, p.error)
        return False
