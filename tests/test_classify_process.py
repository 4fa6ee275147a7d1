"""The classifier in a child process (what the desktop app classifies with): the same predictions
as in-process, cancel, a killed child, a bad model, and a child that never outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bcc_desk.bundle import load_bundle
from bcc_desk.classify_process import ClassifierCrashed, ClassifierProcess, ClassifyFailed, Prepared, Rows
from bcc_desk.images import discover_images
from bcc_desk.options import ClassifierOptions, RunSpec

from bundles import LABELS, make_bundle
from folders import spread_images

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m 'not slow'` leaves this module out

OPTIONS = ClassifierOptions(device="cpu", compile=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("process-model") / "atto", review_threshold=0.6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, all4) -> Path:
    """300 real images in 3 slide folders, and one file that is no image."""
    root = spread_images(tmp_path_factory.mktemp("process") / "case", sorted(all4.glob("*/*.jpg")), 300,
                         lambda k: f"slide-{k % 3}")
    (root / "slide-0" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture()
def engine():
    engine = ClassifierProcess()
    yield engine
    engine.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) counts as gone.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def wait_gone(pid: int, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_same_predictions_as_the_classifier_in_process(engine, bundle: Path, folder: Path) -> None:
    paths = discover_images(folder)[:40] + [folder / "slide-0" / "broken.jpg"]
    messages = list(engine.classify(RunSpec((bundle,), OPTIONS), paths, folder, command="bcc-desk case"))
    first, rows = messages[0], messages[1:]
    in_process = OPTIONS.build(load_bundle(bundle))
    # The same numerics as in this process: fp32 on an AVX2-only CPU, bf16 where the CPU has it.
    assert isinstance(first, Prepared) and first.total == len(paths) and first.device == in_process.device_label
    assert first.run_info.classes == LABELS and first.run_info.command == "bcc-desk case"
    got = [p for m in rows if isinstance(m, Rows) for p in m.predictions]
    expected = list(in_process.predict_paths(paths, folder))
    assert [p.path for p in got] == paths
    assert [(p.file, p.slide, p.label, p.needs_review, p.error) for p in got] == \
           [(p.file, p.slide, p.label, p.needs_review, p.error) for p in expected]
    assert all(abs(a.confidence - b.confidence) < 1e-5 for a, b in zip(got, expected, strict=True) if a.ok)
    assert got[-1].error is not None  # the broken file is a record, not a failure


def test_cancel_returns_and_the_next_request_gets_only_its_own_rows(engine, bundle: Path, folder: Path) -> None:
    paths = discover_images(folder)
    stop = False
    seen = 0
    for message in engine.classify(RunSpec((bundle,), OPTIONS), paths, folder, command="x", stop=lambda: stop):
        if isinstance(message, Rows):
            seen += len(message.predictions)
            stop = True
    assert 0 < seen < len(paths)
    pid = engine.pid
    small = paths[:7]
    rows = [p for m in engine.classify(RunSpec((bundle,), OPTIONS), small, folder, command="x") if isinstance(m, Rows)
            for p in m.predictions]
    assert [p.path for p in rows] == small
    assert engine.pid == pid  # the same child, its model still loaded


def test_a_killed_child_is_one_error_and_the_next_request_starts_another(engine, bundle: Path, folder: Path) -> None:
    paths = discover_images(folder)
    kept = []
    with pytest.raises(ClassifierCrashed, match="SIGKILL") as crash:
        for message in engine.classify(RunSpec((bundle,), OPTIONS), paths, folder, command="x"):
            if isinstance(message, Rows):
                kept += message.predictions
                if engine.pid is not None and len(kept) < len(paths):
                    os.kill(engine.pid, signal.SIGKILL)
    assert "stopped unexpectedly" in str(crash.value) and "\n" not in str(crash.value)
    assert 0 < len(kept) < len(paths) and engine.pid is None
    rows = [p for m in engine.classify(RunSpec((bundle,), OPTIONS), paths[:3], folder, command="x") if isinstance(m, Rows)
            for p in m.predictions]
    assert [p.path for p in rows] == paths[:3] and engine.pid is not None


def test_a_bad_model_is_a_one_line_failure_and_the_child_stays(engine, bundle: Path, folder: Path, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bundle.json").write_text("{ not json")
    paths = discover_images(folder)[:3]
    with pytest.raises(ClassifyFailed) as failed:
        list(engine.classify(RunSpec((tmp_path / "bad",), OPTIONS), paths, folder, command="x"))
    assert "bundle.json" in str(failed.value) and "\n" not in str(failed.value)
    pid = engine.pid
    rows = [m for m in engine.classify(RunSpec((bundle,), OPTIONS), paths, folder, command="x") if isinstance(m, Rows)]
    assert sum(len(m.predictions) for m in rows) == 3 and engine.pid == pid


def test_close_ends_the_child(bundle: Path, folder: Path) -> None:
    engine = ClassifierProcess()
    list(engine.classify(RunSpec((bundle,), OPTIONS), discover_images(folder)[:2], folder, command="x"))
    pid = engine.pid
    assert pid is not None and alive(pid)
    engine.close()
    assert engine.pid is None and wait_gone(pid)


def test_the_child_never_outlives_its_parent(bundle: Path, folder: Path, tmp_path: Path) -> None:
    """An app killed outright (no close, no atexit) takes its classifier process with it, even
    in the middle of a run."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from bcc_desk.options import ClassifierOptions, RunSpec
        from bcc_desk.classify_process import ClassifierProcess, Rows
        from bcc_desk.images import discover_images

        if __name__ == "__main__":
            engine = ClassifierProcess()
            folder = Path({str(folder)!r})
            for message in engine.classify(RunSpec((Path({str(bundle)!r}),), ClassifierOptions(device="cpu", compile=False)),
                                           discover_images(folder) * 20, folder, command="x"):
                if isinstance(message, Rows):
                    print(engine.pid, flush=True)
                    sys.stdin.readline()  # the test kills this process here
    """))
    app = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(app.stdout.readline())
        assert alive(child)
        app.kill()
        app.wait()
        assert wait_gone(child)
    finally:
        app.kill()


def test_a_prepared_model_is_the_one_used_and_a_bad_one_is_said_by_the_request(engine, bundle: Path, folder: Path,
                                                                               tmp_path: Path) -> None:
    """The app asks for its model as the window opens; the first folder then finds it loaded."""
    (tmp_path / "bad").mkdir()
    engine.prepare(RunSpec((tmp_path / "bad",), OPTIONS))  # not a bundle: nothing to say until it is used
    engine.prepare(RunSpec((bundle,), OPTIONS))
    pid = engine.pid
    assert pid is not None
    paths = discover_images(folder)[:4]
    rows = [p for m in engine.classify(RunSpec((bundle,), OPTIONS), paths, folder, command="x") if isinstance(m, Rows)
            for p in m.predictions]
    assert [p.path for p in rows] == paths and engine.pid == pid
    with pytest.raises(ClassifyFailed, match="bundle"):
        list(engine.classify(RunSpec((tmp_path / "bad",), OPTIONS), paths, folder, command="x"))


def test_a_watch_and_a_folder_run_take_turns_each_getting_its_own_predictions(engine, bundle: Path,
                                                                              folder: Path) -> None:
    """The app's watch (a `ChildClassifier`) and a folder's run share one child: requests from two
    threads at once each get every one of their own predictions, in order; a watch told to stop
    while waiting for its turn returns at once with nothing."""
    import threading

    from bcc_desk.classify_process import ChildClassifier

    spec = RunSpec((bundle,), OPTIONS)
    paths = discover_images(folder)
    watch = ChildClassifier(engine, spec, folder, command="bcc-desk case")
    assert watch.sha256 == load_bundle(bundle).sha256 and watch.batch_size > 0
    assert watch.review_policy.alone == pytest.approx(0.6)
    run: list = []
    thread = threading.Thread(target=lambda: run.extend(engine.classify(spec, paths[:200], folder, command="run")))
    thread.start()
    watched = list(watch.predict_paths(paths[200:230], folder))  # while the run holds the child, or after it
    thread.join(120)
    assert [p.path for p in watched] == paths[200:230] and all(p.label for p in watched)
    assert [p.path for m in run if isinstance(m, Rows) for p in m.predictions] == paths[:200]
    # A watch stopping while a run holds the child does not wait for the run.
    stopped = threading.Event()
    waiting = ChildClassifier(engine, spec, folder, command="bcc-desk case", stop=stopped.is_set)
    running = engine.classify(spec, paths, folder, command="run")
    next(running)  # the run has the child now
    stopped.set()
    started = time.monotonic()
    assert list(waiting.predict_paths(paths[:5], folder)) == [] and time.monotonic() - started < 2
    running.close()
