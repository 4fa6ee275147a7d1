"""When is a file in the watched folder complete enough to classify?

A camera may write an image over seconds, a copy from a USB stick over minutes.  Three kinds of
evidence, strongest first:

* COMPLETE: the writer closed the file (inotify's IN_CLOSE_WRITE, Linux only) or the file was
  renamed/moved into place (its content was written before).  Ready at once.
* WRITING: a write was seen and, on a platform that reports closes, no close yet: the writer
  still has the file open.  Wait for the close; only a file that stays unchanged for `stall`
  seconds without one is tried anyway (a writer that never closes, lost events).
* SEEN: anything else (the polling observer, Windows, macOS, files found by a rescan): ready
  when size and mtime have not changed for `settle` seconds.

Whatever the evidence, the image must then decode; a read that fails is retried after
`settle`, 3x`settle` and 9x`settle` (a writer that paused), and any change to the file starts
the count again.  This module keeps that bookkeeping in memory; it does no I/O of its own
except through the `stat` callable the watcher hands to `ready`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

SEEN, WRITING, COMPLETE = "seen", "writing", "complete"
READ_RETRIES = 3
"""Failed reads of unchanged content retried this many times before the file is an error."""


@dataclass
class _Entry:
    size: int
    mtime_ns: int
    changed: float
    """Monotonic time the size or mtime last changed (as far as we saw)."""
    complete: bool
    writing: bool
    attempts: int = 0
    not_before: float = 0.0


K = TypeVar("K", bound=Hashable)


class Settler(Generic[K]):
    """Files not yet ready, keyed by whatever the caller uses (relative paths)."""

    def __init__(self, settle: float, stall: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle = settle
        self.stall = stall if stall is not None else max(30.0, 10 * settle)
        self._clock = clock
        self._pending: dict[K, _Entry] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def waiting(self) -> list[K]:
        return list(self._pending)

    def note(self, key: K, st: os.stat_result, evidence: str = SEEN) -> bool:
        """Record what an event or scan said about a file; True when it is new here."""
        now = self._clock()
        e = self._pending.get(key)
        if e is None:
            self._pending[key] = _Entry(
                st.st_size, st.st_mtime_ns, now, complete=evidence == COMPLETE, writing=evidence == WRITING
            )
            return True
        changed = self._update(e, st, now)
        if evidence == COMPLETE:
            e.complete, e.writing = True, False
        elif evidence == WRITING:
            e.complete, e.writing = False, True
        elif changed:
            e.complete = False  # written again after it was complete: settle anew
        return False

    def forget(self, key: K) -> None:
        self._pending.pop(key, None)

    def retry(self, key: K) -> int:
        """Count a failed read and space the next try; returns the failures so far."""
        e = self._pending[key]
        e.attempts += 1
        e.not_before = self._clock() + self.settle * 3 ** (e.attempts - 1)
        return e.attempts

    def ready(
        self, stat: Callable[[K], os.stat_result | None]
    ) -> tuple[list[tuple[K, os.stat_result]], list[K]]:
        """(files ready now with their current stat, files that disappeared)."""
        now = self._clock()
        ready: list[tuple[K, os.stat_result]] = []
        gone: list[K] = []
        for key, e in list(self._pending.items()):
            if now < e.not_before or now < e.changed + self._wait(e):
                continue
            st = stat(key)
            if st is None:
                gone.append(key)
                del self._pending[key]
                continue
            if self._update(e, st, now) and not e.complete:
                continue  # it moved on since we last looked: start settling again
            ready.append((key, st))
        return ready, gone

    def next_due(self) -> float | None:
        """Seconds until the next file may be ready (None when nothing is pending)."""
        if not self._pending:
            return None
        now = self._clock()
        return max(0.0, min(max(e.not_before, e.changed + self._wait(e)) for e in self._pending.values()) - now)

    def _wait(self, e: _Entry) -> float:
        return 0.0 if e.complete else self.stall if e.writing else self.settle

    @staticmethod
    def _update(e: _Entry, st: os.stat_result, now: float) -> bool:
        """Take a new stat; a change restarts settling and the read-retry count."""
        if (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns):
            return False
        e.size, e.mtime_ns, e.changed = st.st_size, st.st_mtime_ns, now
        e.attempts, e.not_before = 0, 0.0
        return True
