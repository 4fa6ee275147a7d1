"""Storage faults as a lab's PC meets them, on real file systems: a small tmpfs filled up, made
read-only, a report folder removed during a run.  Each case: no result lost (report or ledger
rows read back), one line for the user (no traceback), the documented exit code."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bcc_desk.cli import EXIT_ELSEWHERE
from bcc_desk.images import discover_images
from bcc_desk.watch.ledger import DONE

from bundles import make_bundle
from folders import spread_images
from waits import report_files, report_rows, rows, wait_for

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m 'not slow'` leaves this module out

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Traceback", "Exception ignored", "Logging error")


class Disk:
    """A small tmpfs of its own (root only: the tests run as root in CI), to fill and free, or
    to make read-only and writable again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self) -> None:
        with open(self.path / ".filler", "ab", buffering=0) as fh:  # unbuffered: close has nothing to flush
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            with contextlib.suppress(OSError):  # the last few pages
                while fh.write(b"\0" * 4096):
                    pass
        assert shutil.disk_usage(self.path).free < 8192

    def free(self) -> None:
        (self.path / ".filler").unlink()

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Disk]:
    path.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           check=False, capture_output=True).returncode != 0:
        pytest.fail("the storage fault tests mount a small tmpfs: run them as root (CI does)")
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("faults-model") / "atto")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, all4: Path) -> Path:
    """1,200 real images (hard links) in 4 slide folders: a run long enough to break things in."""
    return spread_images(tmp_path_factory.mktemp("faults") / "case", sorted(all4.glob("*/*.jpg")), 1200,
                         lambda k: f"slide-{k % 4}")


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    # A wide console: one log record, one line (rich wraps at 80 columns when not on a terminal).
    return {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "COLUMNS": "1000"}


def classify(folder: Path, out: Path, model: Path, env: dict, console: Path) -> subprocess.Popen:
    # Eager (--no-compile): these runs test storage, and compiling costs up to 20 s a run here.
    with open(console, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "bcc_desk", "classify", str(folder), "--out", str(out),
                                 "--model", str(model), "--quiet", "--no-compile"], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)


def reading_images(proc: subprocess.Popen, folder: Path) -> bool:
    """The run is classifying: it has one of the folder's images open (its start-up check that
    the report's folder is writable is long done).  An image, not a folder: finding the images
    holds the slide folders open before that check."""
    assert proc.poll() is None, "the run ended before the fault could be made"
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith(str(folder)) and target.lower().endswith(".jpg"):
                    return True
    return False


def one_line_about(console: str, *words: str) -> list[str]:
    assert not any(noise in console for noise in NOISE), console
    return [line for line in console.splitlines() if all(w in line for w in words)]


def fallback_report(env: dict) -> Path:
    [report] = (Path(env["XDG_DATA_HOME"]) / "bcc-desk" / "reports").glob("*.xlsx")
    return report


def every_image_once(report: Path, folder: Path) -> bool:
    files = [r["file"] for r in report_rows(report)]
    expected = {p.relative_to(folder).as_posix() for p in discover_images(folder)}
    return len(files) == len(set(files)) == len(expected) and set(files) == expected


# ---------------------------------------------------------------------------------------------
# bcc classify


def test_classify_onto_a_full_disk_keeps_every_result(tmp_path: Path, model: Path, folder: Path, env) -> None:
    with small_disk(tmp_path / "disk") as disk:
        previous = disk.path / "bcc-report.xlsx"
        previous.write_bytes(b"yesterday's report")
        disk.fill()
        console = tmp_path / "console.txt"
        proc = classify(folder, previous, model, env, console)
        assert proc.wait(600) == EXIT_ELSEWHERE
        text = console.read_text()
        [line] = one_line_about(text, "No space left on device", str(fallback_report(env)))
        assert previous.read_bytes() == b"yesterday's report"  # untouched, and no temp file left
        assert sorted(p.name for p in disk.path.iterdir()) == [".filler", "bcc-report.xlsx"]
    assert every_image_once(fallback_report(env), folder)


@pytest.mark.parametrize("fault", ["removed", "read-only"])
def test_the_report_folder_broken_during_the_run_loses_nothing(tmp_path: Path, model: Path, folder: Path, env,
                                                               fault: str) -> None:
    with small_disk(tmp_path / "disk") as disk:
        reports = disk.path / "reports"
        reports.mkdir()
        console = tmp_path / "console.txt"
        proc = classify(folder, reports / "out.xlsx", model, env, console)
        try:
            wait_for("the run to be classifying", lambda: reading_images(proc, folder), timeout=120)
            if fault == "removed":
                shutil.rmtree(reports)
            else:
                disk.remount("ro")
            assert proc.wait(600) == EXIT_ELSEWHERE
        finally:
            proc.kill()
        reason = "does not exist" if fault == "removed" else "Read-only file system"
        [line] = one_line_about(console.read_text(), reason, str(fallback_report(env)))
    assert every_image_once(fallback_report(env), folder)


# ---------------------------------------------------------------------------------------------
# bcc watch


def watch(root: Path, out: Path, state: Path, model: Path, env: dict, console: Path) -> subprocess.Popen:
    with open(console, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "bcc_desk", "watch", str(root), "--out", str(out), "--state",
                                 str(state), "--model", str(model), "--settle", "0.3"], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def arrive(images: list[Path], root: Path, start: int, stop: int) -> set[str]:
    names = set()
    for i in range(start, stop):
        name = f"slide-{i % 2}/{i:03d}.jpg"
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(images[i], root / name)
        names.add(name)
    return names


def done(state: Path, names: set[str]) -> bool:
    recorded = rows(state)
    return all(n in recorded and recorded[n].state == DONE for n in names)


def test_a_ledger_whose_disk_fills_pauses_and_resumes_with_nothing_missed(tmp_path: Path, model: Path, env,
                                                                          all4: Path) -> None:
    images = sorted(all4.glob("*/*.jpg"))[::7]
    root, out = tmp_path / "export", tmp_path / "report.xlsx"
    root.mkdir()
    console = tmp_path / "console.txt"
    with small_disk(tmp_path / "disk") as disk:
        state = disk.path / "ledger.sqlite"
        proc = watch(root, out, state, model, env, console)
        try:
            wait_for("the daemon to be ready", lambda: "INFO ready" in state.with_suffix(".log").read_text()
                     if state.with_suffix(".log").exists() else False, timeout=180)
            first = arrive(images, root, 0, 5)
            wait_for("the first images recorded", lambda: done(state, first))
            disk.fill()
            later = arrive(images, root, 5, 25)
            wait_for("the pause said", lambda: "intake paused" in console.read_text())
            time.sleep(5)  # it retries meanwhile (1, 2, 4 s): still one line
            assert not done(state, later)
            disk.free()
            wait_for("every image recorded after the space came back", lambda: done(state, first | later), timeout=120)
            wait_for("the report with every image", lambda: report_files(out) == sorted(first | later))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
        recorded = rows(state)
    text = console.read_text()
    assert len(one_line_about(text, "intake paused", "no space left")) == 1
    assert len(one_line_about(text, "intake resumed")) == 1
    assert sorted(k for k, r in recorded.items() if r.state == DONE) == sorted(first | later)


def test_a_report_whose_disk_is_full_is_one_line_and_written_once_there_is_room(tmp_path: Path, model: Path, env,
                                                                                all4: Path) -> None:
    images = sorted(all4.glob("*/*.jpg"))[::11]
    root = tmp_path / "export"
    root.mkdir()
    console = tmp_path / "console.txt"
    with small_disk(tmp_path / "disk", size="1m") as disk:
        out = disk.path / "report.xlsx"
        state = tmp_path / "state" / "ledger.sqlite"
        proc = watch(root, out, state, model, env, console)
        try:
            wait_for("the first report", out.exists, timeout=180)
            disk.fill()
            names = arrive(images, root, 0, 12)
            wait_for("every image in the ledger", lambda: done(state, names), timeout=120)
            wait_for("the failure said", lambda: "cannot write the report" in console.read_text())
            time.sleep(3)
            disk.free()
            wait_for("the report once there is room", lambda: report_files(out) == sorted(names), timeout=60)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    assert len(one_line_about(console.read_text(), "cannot write the report", "No space left")) == 1


# ---------------------------------------------------------------------------------------------
# The desktop app's export


def test_the_apps_export_onto_a_full_disk_goes_to_the_fallback_with_one_message(qtbot, tmp_path: Path, model: Path,
                                                                                 all4: Path, monkeypatch) -> None:
    from PySide6.QtCore import QSettings

    from bcc_desk.gui import MainWindow
    from bcc_desk.options import ClassifierOptions, RunSpec

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    case = spread_images(tmp_path / "case", sorted(all4.glob("*/*.jpg"))[:12], 12, lambda k: f"slide-{k % 2}")
    window = MainWindow(spec=RunSpec((model,), ClassifierOptions(device="cpu", compile=False)), ask_before_close=False,
                        settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    messages: list[str] = []
    window.error_shown.connect(messages.append)
    with qtbot.waitSignal(window.classification_finished, timeout=120_000):
        window.open_folder(case)
    window.set_review(0, window.classes[2])
    with small_disk(tmp_path / "disk") as disk:
        disk.fill()
        written = window.export_report(disk.path / "review.xlsx")
    assert written.parent == tmp_path / "data" / "bcc-desk" / "reports"
    assert len(messages) == 1 and "No space left on device" in messages[0] and str(written) in messages[0]
    by_file = {r["file"]: r for r in report_rows(written)}
    assert len(by_file) == 12 and by_file[window.predictions()[0].file]["reviewer label"] == window.classes[2]
    assert not window.session.unexported_reviews
