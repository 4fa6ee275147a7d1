"""Small previews for the table, decoded off the UI thread only when a row is on screen.

A folder of 5,000 camera images must not be decoded up front (minutes, gigabytes), so the table
asks for a thumbnail when it paints a row and gets it a moment later.  Requests are served
newest first, and the backlog is capped: while the user scrolls fast, rows that have already
left the screen are dropped rather than decoded.  The cache is an LRU of small QImages.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image
from PySide6.QtCore import QObject, Qt, QThreadPool, Signal
from PySide6.QtGui import QImage

from bcc_desk.images import ImageReadError, open_image


def pil_to_qimage(image: Image.Image) -> QImage:
    """An RGB or RGBA PIL image as a QImage that owns its pixels."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    fmt = QImage.Format.Format_RGBA8888 if image.mode == "RGBA" else QImage.Format.Format_RGB888
    data = image.tobytes()
    channels = 4 if image.mode == "RGBA" else 3
    return QImage(data, image.width, image.height, channels * image.width, fmt).copy()


def load_thumbnail(path: Path, size: int) -> QImage | None:
    """A size x size (at most) preview, or None for an unreadable file."""
    try:
        image = open_image(path, reduce_to=size)
    except ImageReadError:
        return None
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    return pil_to_qimage(image)


class ThumbnailCache(QObject):
    """`get(path)` answers at once from the cache, or None and `ready(path)` when it is loaded."""

    ready = Signal(object)
    _loaded = Signal(object, object, int)  # path, QImage or None, generation

    def __init__(self, size: int = 44, capacity: int = 1500, backlog: int = 120, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.size = size
        self.capacity = capacity
        self.backlog = backlog
        self._cache: OrderedDict[Path, QImage | None] = OrderedDict()
        self._wanted: list[Path] = []  # newest last; guarded by _lock (read by pool threads)
        self._pending: set[Path] = set()
        self._lock = threading.Lock()
        self._generation = 0
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)  # the classifier owns the CPU; previews are extra
        self._loaded.connect(self._store, Qt.ConnectionType.QueuedConnection)

    def get(self, path: Path) -> QImage | None:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        with self._lock:
            if path in self._pending:
                return None
            self._pending.add(path)
            self._wanted.append(path)
            if len(self._wanted) > self.backlog:  # drop the oldest requests: scrolled away
                for stale in self._wanted[: -self.backlog]:
                    self._pending.discard(stale)
                del self._wanted[: -self.backlog]
        self._pool.start(self._load_next)
        return None

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._wanted.clear()
            self._pending.clear()
        self._cache.clear()

    def forget(self, path: Path) -> None:
        """Drop the preview of a file whose content changed (the next `get` loads it again)."""
        self._cache.pop(path, None)

    def wait(self) -> None:
        """Block until queued loads are done (tests and shutdown)."""
        self._pool.waitForDone()

    def __len__(self) -> int:
        return len(self._cache)

    def _load_next(self) -> None:
        with self._lock:
            if not self._wanted:
                return
            path = self._wanted.pop()
            generation = self._generation
        self._loaded.emit(path, load_thumbnail(path, self.size), generation)

    def _store(self, path: Path, image: QImage | None, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._pending.discard(path)
        self._cache[path] = image
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        self.ready.emit(path)
