"""The watch's report, rewritten from the ledger in a thread of its own (`ReportWriter`)."""

from __future__ import annotations

import logging
import logging.handlers
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from bcc_desk.lab_records import LabRecords, SlidesFileError, read_slides_csv
from bcc_desk.prediction import Prediction
from bcc_desk.report_file import ReportError, locked_target, remove_orphaned_temps
from bcc_desk.report_target import writer_for
from bcc_desk.run_record import RunInfo
from bcc_desk.watch.ledger import Ledger

log = logging.getLogger(__name__)


class _Repeats(logging.Filter):
    """Let the report writer's 'target is locked, wrote beside it' warning through once per
    episode, not every few seconds while the workbook stays open."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.threadName != ReportWriter.THREAD:
            return True
        message = record.getMessage()
        if message == self.last:
            return False
        self.last = message
        return True


class ReportWriter:
    """Rewrites the report from the ledger in a thread of its own: once ledger changes have been
    quiet for `quiet` seconds (a burst does not rewrite it per file), at least every `max_wait`
    seconds during a long burst (longer when the workbook grows slow to write), again as soon as
    a locked target frees, and a last time at shutdown."""

    THREAD = "bcc-report"
    LOCK_RECHECK = 2.0
    FAILED_RETRY = 10.0

    def __init__(self, state: Path, out: Path, run: RunInfo, *, quiet: float = 1.0, max_wait: float = 5.0,
                 review: Callable[[list[Prediction]], list[Prediction]] | None = None, root: Path | None = None) -> None:
        self.state, self.out, self.run = Path(state), Path(out), run
        # The ledger keeps each image's own outcome; the report flags them as their slides stand.
        self.review = review or list
        self.quiet, self.max_wait = quiet, max_wait
        self._write: Callable[..., Path] = writer_for(self.out)
        self.root = root
        """Where `slides.csv` is read, afresh for each write (a lab fills it in as slides arrive)."""
        self.pdf: Path | None = None
        """A PDF report kept beside `out` (`bcc watch --pdf`), written after it each time."""
        self.lab_name = ""
        self._pdf_fallback: Path | None = None
        self._slides_problem: str | None = None
        self._cond = threading.Condition()
        now = time.monotonic()
        self._dirty_since: float | None = now  # the first report right away: the daemon is up
        self._last_change = now - quiet
        self._retry_at: float | None = None
        self._closing = False
        self._fallback: Path | None = None
        self._duration = 0.0
        self._last_end = 0.0
        self._failure: str | None = None
        self._filter = _Repeats()
        self._thread = threading.Thread(target=self._loop, name=self.THREAD, daemon=True)
        self.written: Path | None = None
        """Where the last report went (the target, or a sibling while the target is locked)."""
        self.writes = 0

    def start(self) -> None:
        logging.getLogger("bcc_desk.report").addFilter(self._filter)
        # A daemon killed mid-write (SIGKILL, a power cut) left its temporary report beside ROOT's.
        removed = [p for target in (self.out, self.pdf) if target is not None for p in remove_orphaned_temps(target)]
        if removed:
            log.info("removed %s, left by a report write that was cut short", ", ".join(p.name for p in removed))
        self._thread.start()

    def changed(self) -> None:
        with self._cond:
            now = time.monotonic()
            if self._dirty_since is None:
                self._dirty_since = now
            self._last_change = now
            self._cond.notify()

    def close(self, finished: datetime) -> None:
        """Write the final report (the Run sheet says when the watch ended) and stop."""
        with self._cond:
            self.run = replace(self.run, finished=finished)
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        else:  # never started (the watch failed early): still leave a report behind
            self._loop()
        logging.getLogger("bcc_desk.report").removeFilter(self._filter)

    def _due(self) -> float | None:
        times = []
        if self._dirty_since is not None:
            burst_limit = self._dirty_since + max(self.max_wait, 5 * self._duration)
            due = min(self._last_change + self.quiet, burst_limit)
            # A workbook grown slow to write (weeks of images) is not rewritten back to back by a
            # steady trickle: at most a third of the time goes into writing it.
            times.append(max(due, self._last_end + 2 * self._duration))
        if self._retry_at is not None:
            times.append(self._retry_at)
        return min(times) if times else None

    def _loop(self) -> None:
        ledger = Ledger(self.state)  # this thread's own connection
        try:
            while True:
                with self._cond:
                    while not self._closing:
                        due, now = self._due(), time.monotonic()
                        if due is not None and due <= now:
                            break
                        self._cond.wait(None if due is None else due - now)
                    closing, dirty = self._closing, self._dirty_since is not None
                    self._dirty_since = None
                if dirty or closing or self._fallback is None or not locked_target(self.out):
                    self._write_once(ledger)
                else:
                    self._retry_at = time.monotonic() + self.LOCK_RECHECK  # still open in Excel
                if closing:
                    return
        finally:
            ledger.close()

    def _lab(self) -> LabRecords:
        try:
            identities = read_slides_csv(self.root) if self.root is not None else {}
        except SlidesFileError as exc:  # said once, not at every write; the report goes on without
            if str(exc) != self._slides_problem:
                log.warning("%s; the report shows no patient ids until it is fixed", exc)
            self._slides_problem = str(exc)
            return LabRecords(lab_name=self.lab_name)
        self._slides_problem = None
        return LabRecords(identities=identities, lab_name=self.lab_name)

    def _write_once(self, ledger: Ledger) -> None:
        started = time.monotonic()
        try:
            predictions, lab = self.review(ledger.predictions()), self._lab()
            written = self._write(predictions, self.out, self.run, fallback=self._fallback, lab=lab)
            if self.pdf is not None:
                from bcc_desk.pdf_report import write_pdf

                pdf = write_pdf(predictions, self.pdf, self.run, fallback=self._pdf_fallback, lab=lab)
                self._pdf_fallback = pdf if pdf != self.pdf else None
        except Exception as exc:  # whatever it is, the daemon and the ledger go on
            message = str(exc)
            if message != self._failure:
                log.error("%s; every result is kept in the ledger, trying again every %g s",
                          message, self.FAILED_RETRY, exc_info=not isinstance(exc, (ReportError, OSError)))
                self._failure = message
            self._retry_at = time.monotonic() + self.FAILED_RETRY
            return
        self._last_end = time.monotonic()
        self._duration = self._last_end - started
        if self._failure is not None:
            log.info("the report is written again: %s", written)
            self._failure = None
        if written != self.out:
            self._fallback = written
            wait = self.LOCK_RECHECK if locked_target(self.out) else self.FAILED_RETRY
            self._retry_at = time.monotonic() + wait
        else:
            if self._fallback is not None:
                log.info("the report target is free again: %s is up to date (the copy %s stays)",
                         self.out, self._fallback.name)
                self._filter.last = None
            self._fallback = None
            self._retry_at = None
        self.written = written
        self.writes += 1
