"""How a watch hears of files: watchdog's observer for ROOT, the queue its threads fill, and
ROOT's identity (a folder replaced under the same name is a new folder)."""

from __future__ import annotations

import os
import queue
import stat
import sys
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

EVENTS = [
    FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
    DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
]  # no open / close-without-write events: our own reads would echo back as work


def make_observer(polling: bool, interval: float) -> tuple[BaseObserver, bool]:
    """(observer, whether it reports closed-after-writing)."""
    if polling:
        from watchdog.observers.polling import PollingObserver

        return PollingObserver(timeout=interval), False
    if sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyObserver

        # Full events: a file moved in from outside ROOT is a move (complete), not a create.
        return InotifyObserver(generate_full_events=True), True
    from watchdog.observers import Observer

    return Observer(), False


class EventQueue(FileSystemEventHandler):
    """Observer threads -> the work loop.  SimpleQueue, because `stop` may run in a signal
    handler and only SimpleQueue.put is safe there."""

    def __init__(self) -> None:
        super().__init__()
        self.q: queue.SimpleQueue[FileSystemEvent | None] = queue.SimpleQueue()

    def dispatch(self, event: FileSystemEvent) -> None:  # watchdog's handler interface
        self.q.put(event)


def folder_identity(root: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(root)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
