"""The classifier in a child process, for a front end whose own threads must never wait on the
network: the desktop app.

The int8 package (and, less so, every compiled forward) holds Python's GIL through a whole batch,
so a classifier on a thread of the app's process froze its window for ~170 ms a batch and for
seconds on the first.  In a process of its own it runs as fast as `bcc classify` (int8 included)
while the window only unpickles finished predictions.

* One child, started on the first request (spawn: no Qt or thread state is forked) and kept, with
  its model loaded, between requests; a changed model choice or a bundle replaced on disk is
  loaded afresh.
* Cancelling is immediate for the caller: `classify` returns at once and the child drops the rest
  of that request at its next image; anything it still sends for it is ignored.
* A child that dies (killed, out of memory, a crash in native code) raises `ClassifierCrashed`
  with the reason; the predictions already delivered stand and the next request starts a new child.
* The child ends with its parent: on `close`, and by itself when the parent process is gone.
* Requests from several threads (a folder's run, the app's watch) take turns: one network, one
  request at a time, each waiting for the one before it (or for its own `stop`).
* `ChildClassifier` is the child's classifier as the watch's `Watcher` uses one, so the app's watch
  runs the network here too and the window's process never imports torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bcc_desk.messages import one_line
from bcc_desk.prediction import Prediction

if TYPE_CHECKING:
    from bcc_desk.options import RunSpec
    from bcc_desk.run_record import RunInfo

POLL_S = 0.05
"""How often a waiting caller looks at its stop flag: the latency of a cancel."""


@dataclass(frozen=True)
class Prepared:
    """The model is loaded and the request is starting."""

    total: int
    device: str
    """The numerics the run starts with (e.g. 'cpu (fp32)'); int8 may take over after compiling."""
    preparing: str | None
    """What happens before the first batch, worth showing (compiling, building int8), or None."""
    run_info: RunInfo
    """The Run sheet's record of the classifier that makes the predictions."""
    batch_size: int


@dataclass(frozen=True)
class Rows:
    """Predictions just made, in the order of the request's paths."""

    predictions: list[Prediction]
    device: str


class ClassifyFailed(RuntimeError):
    """The child could not serve the request (a bad bundle, an unusable device): one line."""


class ClassifierCrashed(RuntimeError):
    """The child process died during a request."""


class ClassifierProcess:
    """A `Classifier` in a child process, fed paths, sending predictions back."""

    def __init__(self, emit_interval: float = 0.25) -> None:
        """`emit_interval`: the child sends what it has at most this often (one message per
        image would cost the receiving process more than the images are worth: on 2 cores the
        window's repaints took CPU from the network; 0.25 s measured as fast as `bcc classify`)."""
        self.emit_interval = emit_interval
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._cancelled: Any = None  # shared: the highest request number to drop
        self._request = 0
        self._lock = threading.Lock()  # the pipe's sending end and the request counter
        self._turn = threading.Lock()  # held by the request being served, from its send to its end

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (None before the first request, after close)."""
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def prepare(self, spec: RunSpec) -> None:
        """Start the child now (if it is not running) and have it load this model in the
        background, so that the first folder does not wait for torch's import and the weights.
        Returns at once; a model that cannot be loaded is reported by the request that uses it."""
        with self._lock:
            conn = self._ensure_started()
            with contextlib.suppress(OSError):  # a child that died is noticed by the next request
                conn.send(("prepare", spec))

    def classify(
        self,
        spec: RunSpec,
        paths: Sequence[Path],
        root: Path,
        *,
        command: str,
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[Prepared | Rows]:
        """Classify `paths` (reported relative to `root`) with `spec`'s bundles and options: first
        a `Prepared`, then `Rows` until every path has its prediction.  Returns early, at once,
        when `stop()` turns true or the caller stops iterating.  Raises ClassifyFailed or
        ClassifierCrashed.  A request made while another is served waits for its turn."""
        while not self._turn.acquire(timeout=POLL_S):
            if stop():
                return
        try:
            yield from self._serve_request(spec, paths, root, command, stop)
        finally:
            self._turn.release()

    def _serve_request(self, spec: RunSpec, paths: Sequence[Path], root: Path, command: str,
                       stop: Callable[[], bool]) -> Iterator[Prepared | Rows]:
        with self._lock:
            conn = self._ensure_started()
            self._request += 1
            request = self._request
            conn.send(("classify", request, spec, [str(p) for p in paths], str(root), command))
        process = self._process
        finished = False
        try:
            while not stop():
                message = self._receive(process, conn, request)
                if message is None:
                    continue
                kind, payload = message
                if kind in ("prepared", "rows"):
                    yield payload
                elif kind == "failed":
                    finished = True
                    raise ClassifyFailed(payload)
                else:  # "done"
                    finished = True
                    return
        finally:
            if not finished and self._cancelled is not None:
                self._cancelled.value = request  # the child drops it at its next image

    def _receive(self, process: Any, conn: Connection, request: int) -> tuple[str, Any] | None:
        """The next message of `request` (None: nothing within POLL_S, or another request's)."""
        ready = wait([conn, process.sentinel], timeout=POLL_S)
        if not ready:
            return None
        if conn in ready or conn.poll():
            try:
                kind, number, payload = conn.recv()
            except (EOFError, OSError):
                raise self._crashed(process) from None
            return (kind, payload) if number == request else None
        raise self._crashed(process)

    def _crashed(self, process: Any) -> ClassifierCrashed:
        process.join(5)
        code = process.exitcode
        self._forget()
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        hint = " (the computer may have run out of memory)" if code == -getattr(signal, "SIGKILL", 9) else ""
        return ClassifierCrashed(f"the classifying process stopped unexpectedly ({how}){hint}")

    def _ensure_started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self._forget()
        mine, theirs = self._context.Pipe(duplex=True)
        self._cancelled = self._context.RawValue("q", 0)
        self._request = 0
        self._process = self._context.Process(
            target=_serve, args=(theirs, self._cancelled, self.emit_interval), name="bcc-classifier", daemon=True)
        self._process.start()
        theirs.close()  # the child's end: ours only in the child, so its death closes the pipe
        self._conn = mine
        return mine

    def _forget(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._process = self._cancelled = None

    def close(self, timeout: float = 1.0) -> None:
        """End the child; the next request would start another.  It is asked first and killed
        after `timeout` (still loading a model, say): it holds nothing that is not already
        delivered, and a window closing must not wait on it."""
        with self._lock:
            process, conn = self._process, self._conn
            if process is None:
                return
            if self._cancelled is not None:
                self._cancelled.value = self._request
            try:
                if conn is not None:
                    conn.send(("stop",))
            except OSError:
                pass  # already gone
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(timeout)
            self._forget()


# ---------------------------------------------------------------------------------------------
# The child


def _serve(conn: Connection, cancelled: Any, emit_interval: float) -> None:
    """The child's loop: one request at a time, until told to stop or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in the app's terminal is the app's to handle
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="bcc-parent-watch", daemon=True).start()
    model = _Model()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "prepare":
            _, spec = message
            try:
                for _ in model.get(spec).predict_paths([], Path.cwd()):  # loads a kept int8 package
                    pass
            except Exception:  # noqa: BLE001 - the request that needs this model will say what is wrong
                model.forget(spec)
            continue
        if message[0] != "classify":
            return
        _, request, spec, paths, root, command = message

        def stopped(request: int = request) -> bool:
            return cancelled.value >= request

        try:
            if stopped():  # cancelled before it got here: not even the model is loaded for it
                conn.send(("done", request, None))
                continue
            _run(conn, request, model.get(spec), [Path(p) for p in paths], Path(root), command,
                 stopped, emit_interval)
        except (BrokenPipeError, ConnectionResetError):
            return  # the parent has gone
        except Exception as exc:  # noqa: BLE001 - every failure is the app's one-line message
            try:
                conn.send(("failed", request, one_line(exc)))
            except OSError:
                return


def _exit_with(sentinel: int) -> None:
    """End this process the moment the parent's ends, even in the middle of a batch."""
    wait([sentinel])
    os._exit(0)


class _Model:
    """The child's classifiers, each kept while neither its choice nor a bundle on disk changes.

    Two: the app's folder run (compiled) and its watch (uncompiled) take turns on the same model,
    and each would otherwise rebuild (and recompile) the other's network at every turn."""

    KEEP = 2

    def __init__(self) -> None:
        self.classifiers: dict[RunSpec, tuple[tuple, Any]] = {}  # oldest use first

    def get(self, spec: RunSpec) -> Any:
        from bcc_desk.bundle_meta import bundle_fingerprint

        stamp = tuple(bundle_fingerprint(Path(d)) for d in spec.model_dirs)
        kept = self.classifiers.pop(spec, None)
        if kept is None or kept[0] != stamp:  # new, or its bundle replaced on disk (the old network is gone)
            while len(self.classifiers) >= self.KEEP:
                del self.classifiers[next(iter(self.classifiers))]
            kept = (stamp, spec.build())
        self.classifiers[spec] = kept
        return kept[1]

    def forget(self, spec: RunSpec) -> None:
        self.classifiers.pop(spec, None)


def _run(conn: Connection, request: int, classifier: Any, paths: list[Path], root: Path, command: str,
         stopped: Callable[[], bool], emit_interval: float) -> None:
    from bcc_desk.run_record import run_info

    info = run_info(classifier, root=root, command=command)
    conn.send(("prepared", request, Prepared(len(paths), classifier.device_label, classifier.preparation(len(paths)), info,
                                             classifier.batch_size)))
    pending: list[Prediction] = []
    last = time.monotonic()
    predictions = classifier.predict_paths(paths, root)
    try:
        for prediction in predictions:
            pending.append(prediction)
            if stopped():
                break
            if time.monotonic() - last >= emit_interval:
                conn.send(("rows", request, Rows(pending, classifier.device_label)))
                pending, last = [], time.monotonic()
    finally:
        predictions.close()  # stops the decoding threads when cancelled
    if pending:
        conn.send(("rows", request, Rows(pending, classifier.device_label)))
    conn.send(("done", request, None))


class ChildClassifier:
    """The child's classifier for `spec`, as the watch's `Watcher` uses a `Classifier`: each
    `predict_paths` call is one request to `engine` (waiting for its turn behind a folder's run).
    Built by asking the child (which loads the model) for the run's record; raises as `classify`.
    `stop()` true: a call waiting for its turn, or under way, ends early (the rest stay pending)."""

    def __init__(self, engine: ClassifierProcess, spec: RunSpec, root: Path, *, command: str,
                 stop: Callable[[], bool] = lambda: False) -> None:
        self.engine, self.spec, self.command, self.stop = engine, spec, command, stop
        prepared = None
        for message in engine.classify(spec, [], root, command=command, stop=stop):  # no paths: Prepared, done
            if isinstance(message, Prepared):
                prepared = message
        if prepared is None:
            raise ClassifyFailed("stopped before the model was loaded")
        self.info = prepared.run_info
        self.device_label = prepared.device
        self.batch_size = prepared.batch_size
        self.compile = spec.options.compile
        self.sha256 = "+".join(sha for _, sha in self.info.models)
        self.review_policy = self.info.review_policy

    def run_info(self, *, root: Path, command: str, extra: dict[str, str] | None = None) -> RunInfo:
        """The Run sheet's record (the child's), for `root` and `command`."""
        from datetime import datetime

        return replace(self.info, root=str(root), command=command, extra=dict(extra or {}),
                       started=datetime.now().astimezone(), device=self.device_label)

    def predict_paths(self, paths: Sequence[Path], root: Path) -> Generator[Prediction, None, None]:
        for message in self.engine.classify(self.spec, paths, root, command=self.command, stop=self.stop):
            if isinstance(message, Rows):
                self.device_label = message.device
                yield from message.predictions
