"""Run a plain function on a Qt thread pool and get its result back on the UI thread.

Image decoding and Grad-CAM must not run on the UI thread (a big camera JPEG or a backward pass
would freeze the window), but their results end up in widgets, which only the UI thread may
touch.  A small relay QObject created on the UI thread carries the result across: a signal
emitted from the pool thread is queued to the relay's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QThreadPool, Signal

from bcc_desk.messages import one_line

_live: set[QObject] = set()  # relays wait here until their result is delivered


class _Relay(QObject):
    done = Signal(object)
    failed = Signal(str)


def submit(
    pool: QThreadPool,
    fn: Callable[[], Any],
    on_done: Callable[[Any], None],
    on_failed: Callable[[str], None] | None = None,
) -> None:
    """Run `fn()` on `pool`; call `on_done(result)` or `on_failed(one-line reason)` on the UI thread."""
    relay = _Relay()
    _live.add(relay)

    # Plain one-argument functions as slots: PySide inspects a slot's signature to decide what
    # to pass, and partials or lambdas with defaults are better kept out of that.
    def deliver(result: Any) -> None:
        _live.discard(relay)
        on_done(result)

    def fail(message: str) -> None:
        _live.discard(relay)
        if on_failed is not None:
            on_failed(message)

    relay.done.connect(deliver)
    relay.failed.connect(fail)

    def run() -> None:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - any failure becomes a message, never a crash
            relay.failed.emit(one_line(exc))
            return
        relay.done.emit(result)

    pool.start(run)
