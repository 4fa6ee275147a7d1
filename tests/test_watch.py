"""`bcc watch`: a real observer on a real folder, real image files, the daemon as a real process
killed and restarted, and every workbook read back with openpyxl."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import openpyxl
import pytest
from typer.testing import CliRunner

from bcc_desk import cli
from bcc_desk.bundle import load_bundle
from bcc_desk.classifier import Classifier
from bcc_desk.prediction import REVIEW_DISAGREES
from bcc_desk.run_record import RunInfo
from bcc_desk.watch.ledger import DONE, ERROR, PENDING, VANISHED, Ledger
from bcc_desk.watch.settle import READ_RETRIES
from bcc_desk.watch.site import WatchTiming, claim_watch, default_state, lock_state, log_file
from bcc_desk.watch.watcher import Watcher

from bundles import CLASSES, LABELS, make_bundle
from waits import all_done, report_files, report_rows, rows, wait_for

REPO = Path(__file__).resolve().parents[1]
SETTLE = 0.3
T = TypeVar("T")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("m") / "atto")


@pytest.fixture(scope="module")
def classifier(model: Path) -> Classifier:
    return Classifier([load_bundle(model)], compile=False)


@pytest.fixture(scope="module")
def jpgs(all4: Path) -> list[Path]:
    """Real images, 60 per class, interleaved so that any prefix mixes the classes."""
    per_class = [sorted((all4 / c).glob("*.jpg"))[:60] for c in CLASSES]
    return [f for group in zip(*per_class) for f in group]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def watching(tmp_path: Path, classifier: Classifier, pdf: bool = False, **options) -> Iterator[Watcher]:
    """A Watcher running in a thread on tmp_path/export until the block ends (`pdf`: keeping a
    PDF report beside the workbook, as `bcc watch --pdf`)."""
    root = tmp_path / "export"
    root.mkdir(exist_ok=True)
    out = tmp_path / "reports" / "report.xlsx"
    out.parent.mkdir(exist_ok=True)
    run = RunInfo.collect(
        models=[(classifier.name, classifier.sha256)], classes=classifier.classes,
        review_threshold=classifier.review_threshold, ood_check="off", tta=False,
        device=classifier.device_label, root=root,
    )
    timing = WatchTiming(**{"settle": SETTLE, "quiet": 0.2, **options})  # a short debounce keeps the tests quick
    watcher = Watcher(root, out, classifier, tmp_path / "state" / "ledger.sqlite", run, timing=timing)
    if pdf:
        watcher.report.pdf, watcher.report.lab_name = out.with_suffix(".pdf"), "Haematology"
    thread = threading.Thread(target=watcher.run, name="watcher")
    thread.start()
    try:
        wait_for("the first report (the watch is up)", lambda: watcher.report.written is not None or not thread.is_alive())
        assert thread.is_alive()
        yield watcher
    finally:
        watcher.stop()
        thread.join(30)
        assert not thread.is_alive(), "the watcher did not stop"


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """A folder nobody can create files in: chmod, and for root (whom modes do not stop) the
    immutable attribute."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", str(folder)], check=False, capture_output=True
    ).returncode == 0
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.fail("this test needs a folder it can make read-only (chmod; as root, chattr +i)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Arrival: what counts as an image, and when


def test_a_slowly_written_image_is_read_only_once_complete(tmp_path: Path, classifier: Classifier, jpgs) -> None:
    data = jpgs[0].read_bytes()
    step = len(data) // 4 + 1
    # The slide folder exists before the watch: a file opened in a folder made a moment ago may
    # be written before inotify watches that folder, and then only the settle rule (and the
    # decode check, which refuses the truncated file) protects it; here the close must.
    (tmp_path / "export" / "slide-1").mkdir(parents=True)
    with watching(tmp_path, classifier) as w:
        with open(w.root / "slide-1" / "slow.jpg", "wb") as fh:
            for i in range(0, len(data), step):
                fh.write(data[i : i + step])
                fh.flush()
                # Pauses longer than the settle time: only the close may say the file is done.
                time.sleep(2 * SETTLE)
                row = rows(w.state).get("slide-1/slow.jpg")
                assert row is None or (row.state == PENDING and row.attempts == 0), row
        wait_for("the complete image's row", lambda: all_done(w.state, {"slide-1/slow.jpg"}))
    row = rows(w.state)["slide-1/slow.jpg"]
    assert row.sha256 == sha256(data) and row.attempts == 0 and row.error is None
    assert report_files(w.out) == ["slide-1/slow.jpg"]


@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_copies_moves_and_renamed_temp_files_each_count_once(tmp_path: Path, classifier, jpgs, polling) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "slide-3").mkdir(parents=True)
    shutil.copyfile(jpgs[0], outside / "moved.jpg")
    for f in jpgs[1:4]:
        shutil.copyfile(f, outside / "slide-3" / f.name)
    with watching(tmp_path, classifier, polling=polling, interval=0.2) as w:
        root = w.root
        for slide in ("slide-1", "slide-2", ".thumbnails"):
            (root / slide).mkdir()
        shutil.copyfile(jpgs[4], root / "slide-1" / "copied.jpg")
        shutil.copy2(jpgs[5], root / "slide-1" / "copied-with-metadata.jpg")  # old mtime, read-only
        os.rename(outside / "moved.jpg", root / "slide-2" / "moved.jpg")  # moved in from outside ROOT
        shutil.move(outside / "slide-3", root / "slide-3")  # a whole slide folder moved in
        (root / "slide-1" / "camera.jpg.part").write_bytes(jpgs[6].read_bytes())  # still "downloading"
        (root / "slide-1" / "~$owner.jpg").write_bytes(b"office owner file")
        shutil.copyfile(jpgs[7], root / ".thumbnails" / "thumb.jpg")  # hidden folder: not a slide
        expected = {"slide-1/copied.jpg", "slide-1/copied-with-metadata.jpg", "slide-2/moved.jpg",
                    *(f"slide-3/{f.name}" for f in jpgs[1:4])}
        wait_for("the copied and moved images", lambda: all_done(w.state, expected))
        (root / "slide-1" / "camera.jpg.part").rename(root / "slide-1" / "camera.jpg")
        expected.add("slide-1/camera.jpg")
        wait_for("the renamed temp file", lambda: all_done(w.state, expected))
        assert set(rows(w.state)) == expected
        # A rename inside ROOT: the new name takes the old one's place (and its answer).
        label = rows(w.state)["slide-1/copied.jpg"].label
        (root / "slide-1" / "copied.jpg").rename(root / "slide-2" / "renamed.jpg")
        expected = expected - {"slide-1/copied.jpg"} | {"slide-2/renamed.jpg"}
        wait_for("the renamed image", lambda: all_done(w.state, expected))
        assert rows(w.state)["slide-2/renamed.jpg"].label == label
        assert rows(w.state)["slide-1/copied.jpg"].state == VANISHED
    got = report_rows(w.out)
    assert sorted(r["file"] for r in got) == sorted(expected)
    assert {r["slide"] for r in got} == {"slide-1", "slide-2", "slide-3"}
    assert all(r["label"] in LABELS and r["error"] is None for r in got)


def test_the_report_flags_an_image_once_its_slide_disagrees_with_it(tmp_path: Path, classifier: Classifier, jpgs) -> None:
    """A camera fills a slide field by field: an image alone has nothing to disagree with, and
    once two fields of another label join it the report flags it; the ledger keeps each image's
    own outcome."""
    labels = {f: p.label for f, p in zip(jpgs, classifier.predict_paths(jpgs, jpgs[0].parent))}
    odd = jpgs[0]
    same = [f for f in jpgs if labels[f] != labels[odd]]
    same = [f for f in same if labels[f] == labels[same[0]]][:2]
    assert len(same) == 2, "the test model gives the real images one label only"

    def reasons() -> dict[str, str]:
        return {r["file"]: r["review_reason"] or "" for r in report_rows(w.out)} if w.out.exists() else {}

    with watching(tmp_path, classifier) as w:
        (w.root / "slide").mkdir()
        shutil.copyfile(odd, w.root / "slide" / "1.jpg")
        wait_for("the first field in the report", lambda: "slide/1.jpg" in reasons())
        assert REVIEW_DISAGREES not in reasons()["slide/1.jpg"]
        for i, f in enumerate(same, start=2):
            shutil.copyfile(f, w.root / "slide" / f"{i}.jpg")
        wait_for("the slide's consensus in the report", lambda: len(reasons()) == 3
                 and REVIEW_DISAGREES in reasons()["slide/1.jpg"])
        assert not any(REVIEW_DISAGREES in reasons()[f"slide/{i}.jpg"] for i in (2, 3))
        assert not any(REVIEW_DISAGREES in p.review_reason for p in Ledger(w.state).predictions())


def test_new_content_is_classified_again_in_the_same_row(tmp_path: Path, classifier: Classifier, jpgs) -> None:
    first, second = jpgs[0].read_bytes(), jpgs[1].read_bytes()
    expected = next(classifier.predict_paths([jpgs[1]], jpgs[1].parent))
    with watching(tmp_path, classifier) as w:
        field = w.root / "slide" / "field.jpg"
        field.parent.mkdir()
        field.write_bytes(first)
        wait_for("the first content", lambda: all_done(w.state, {"slide/field.jpg"}))
        field.write_bytes(second)  # the camera overwrites the field with a new shot
        wait_for("the new content", lambda: rows(w.state)["slide/field.jpg"].sha256 == sha256(second)
                 and rows(w.state)["slide/field.jpg"].state == DONE)
        assert len(rows(w.state)) == 1
        before = Ledger(w.state).predictions()[0]
        field.unlink()
        wait_for("the deletion", lambda: rows(w.state)["slide/field.jpg"].state == VANISHED)
        shutil.copyfile(jpgs[1], field)  # back again: the stored answer, not a second classification
        wait_for("the image back", lambda: all_done(w.state, {"slide/field.jpg"}))
        after = Ledger(w.state).predictions()[0]
    assert after.classified_at == before.classified_at
    assert after.probabilities == pytest.approx(expected.probabilities, abs=1e-4)
    got = report_rows(w.out)
    assert [r["file"] for r in got] == ["slide/field.jpg"]
    assert got[0]["label"] == expected.label


def test_names_that_are_not_utf8_are_watched_reported_and_never_stop_the_watch(tmp_path: Path, classifier: Classifier,
                                                                               jpgs) -> None:
    """Linux allows any bytes in a name (issue #39: one such file stopped bcc watch on every
    restart).  It is classified once, kept in the ledger under its real name, reported with its
    odd bytes as \\xNN, and a restart finds it done; the images after it are classified too."""
    odd_slide, odd_file = os.fsdecode(b"slide-\xe9"), os.fsdecode(b"field-\xff\xfe.jpg")
    with watching(tmp_path, classifier) as w:
        (w.root / odd_slide).mkdir()
        shutil.copyfile(jpgs[0], w.root / odd_slide / odd_file)
        shutil.copyfile(jpgs[1], w.root / odd_slide / "after.jpg")
        wait_for("both images", lambda: all_done(w.state, {f"{odd_slide}/{odd_file}", f"{odd_slide}/after.jpg"}))
    assert sorted(report_files(w.out)) == ["slide-\\xe9/after.jpg", "slide-\\xe9/field-\\xff\\xfe.jpg"]
    done = rows(w.state)[f"{odd_slide}/{odd_file}"]
    with watching(tmp_path, classifier) as again:  # the same ledger: nothing to classify again
        time.sleep(3 * SETTLE)
        assert rows(again.state)[f"{odd_slide}/{odd_file}"] == done
        shutil.rmtree(again.root / odd_slide)  # the odd slide folder taken away: its rows vanish
        wait_for("the folder gone", lambda: all(r.state == VANISHED for r in rows(again.state).values()))


def test_a_damaged_ledger_is_moved_aside_and_every_image_classified_again(tmp_path: Path, classifier: Classifier,
                                                                          jpgs, caplog) -> None:
    """Issue #39: a ledger whose pages are damaged (header intact) gave a traceback on every start.
    It is found at start, kept aside under a name the log gives, and a new one is filled from the
    folder: every image once in the report, none lost."""
    names = {f"slide/{i}.jpg" for i in range(3)}
    with watching(tmp_path, classifier) as w:
        (w.root / "slide").mkdir()
        for i, name in enumerate(sorted(names)):
            shutil.copyfile(jpgs[i], w.root / name)
        wait_for("the images", lambda: all_done(w.state, names))
    state = w.state
    data = bytearray(state.read_bytes())
    assert len(data) > 3 * 4096 and not state.with_name(state.name + "-wal").exists()
    data[4096:] = bytes(b ^ 0x5A for b in data[4096:])  # every page after the first (the header's)
    state.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="bcc_desk.watch"), watching(tmp_path, classifier) as again:
        wait_for("the images again", lambda: all_done(again.state, names))
        wait_for("the report", lambda: sorted(report_files(again.out)) == sorted(names))
    [aside] = state.parent.glob(f"{state.name}.damaged-*")
    said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(said) == 1 and aside.name in said[0] and "every image under" in said[0], said
    assert aside.read_bytes() == bytes(data)  # kept as it was, for whoever looks into it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bcc_desk.watch"), watching(tmp_path, classifier) as third:
        assert all_done(third.state, names)  # the new ledger is sound: nothing moved aside again
    assert "damaged" not in caplog.text and len(list(state.parent.glob("*.damaged-*"))) == 1


def test_a_burst_of_hundreds_is_classified_in_batches(tmp_path: Path, classifier: Classifier, jpgs, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="bcc_desk.watch")
    copied, dragged = jpgs[:100], jpgs[100:200]
    usb = tmp_path / "usb" / "slide-usb"
    usb.mkdir(parents=True)
    for f in dragged:
        shutil.copyfile(f, usb / f.name)
    with watching(tmp_path, classifier, quiet=1.0) as w:  # the daemon's own debounce
        for i, f in enumerate(copied):  # a camera or copy tool writing file after file
            slide = w.root / f"slide-{i % 4}"
            slide.mkdir(exist_ok=True)
            shutil.copyfile(f, slide / f.name)
        shutil.move(usb, w.root / "slide-usb")  # and a slide folder dragged in: 100 at once
        expected = {f"slide-{i % 4}/{f.name}" for i, f in enumerate(copied)} | {f"slide-usb/{f.name}" for f in dragged}
        wait_for("the burst", lambda: all_done(w.state, expected), timeout=90)
        writes = w.report.writes
    calls = [int(n) for n in re.findall(r"classifying (\d+) images", caplog.text)]
    # The data set holds byte-identical fields: one that lands after its twin is answered from the
    # ledger ("same image as"), not classified again, so it counts as handled without a network call.
    reused = caplog.text.count("same image as ")
    assert sum(calls) + reused >= len(expected) and max(calls) >= len(dragged), (calls, reused)  # batched
    assert writes < 20, writes  # debounced: not one workbook per image
    assert report_files(w.out) == sorted(expected)


@pytest.mark.slow
def test_an_unreadable_image_becomes_an_error_row_after_spaced_retries(tmp_path, classifier, jpgs, caplog) -> None:
    caplog.set_level(logging.INFO, logger="bcc_desk.watch")
    data = jpgs[0].read_bytes()
    with watching(tmp_path, classifier) as w:
        started = time.monotonic()
        (w.root / "bad.jpg").write_bytes(b"this is not an image" * 100)
        half = w.root / "half.jpg"
        half.write_bytes(data[: len(data) // 2])  # a camera that closes the file between writes
        wait_for("a failed read of the half image", lambda: rows(w.state).get("half.jpg", None)
                 and rows(w.state)["half.jpg"].attempts >= 1)
        with open(half, "ab") as fh:
            fh.write(data[len(data) // 2 :])
        wait_for("the completed image", lambda: all_done(w.state, {"half.jpg"}))
        wait_for("the error row", lambda: rows(w.state).get("bad.jpg") and rows(w.state)["bad.jpg"].state == ERROR)
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # and then it is left alone
        bad = rows(w.state)["bad.jpg"]
    assert bad.attempts == READ_RETRIES + 1 and "not an image" in bad.error
    assert elapsed >= SETTLE * (1 + 3 + 9) * 0.9  # retries spaced, not a tight loop
    assert caplog.text.count("cannot read bad.jpg after") == 1
    got = {r["file"]: r for r in report_rows(w.out)}
    assert set(got) == {"bad.jpg", "half.jpg"}
    assert "not an image" in got["bad.jpg"]["error"] and got["bad.jpg"]["label"] is None
    assert got["half.jpg"]["label"] in LABELS and got["half.jpg"]["error"] is None


def test_the_watch_restarts_when_its_folder_is_deleted_and_recreated(tmp_path, classifier, jpgs, caplog) -> None:
    caplog.set_level(logging.INFO, logger="bcc_desk.watch")
    with watching(tmp_path, classifier) as w:
        shutil.copyfile(jpgs[0], w.root / "before.jpg")
        wait_for("the first image", lambda: all_done(w.state, {"before.jpg"}))
        shutil.rmtree(w.root)  # the share goes away ...
        wait_for("the lost watch to be noticed", lambda: "lost the watch" in caplog.text)
        (w.root / "slide").mkdir(parents=True)  # ... and comes back with new images
        shutil.copyfile(jpgs[1], w.root / "slide" / "after.jpg")
        wait_for("the image in the new folder", lambda: all_done(w.state, {"slide/after.jpg"}))
        shutil.copyfile(jpgs[2], w.root / "slide" / "later.jpg")  # seen by the new observer
        wait_for("an image after the restart", lambda: all_done(w.state, {"slide/later.jpg"}))
        assert rows(w.state)["before.jpg"].state == VANISHED
    assert report_files(w.out) == ["slide/after.jpg", "slide/later.jpg"]


def test_a_share_mounted_over_the_folder_and_unmounted_again(tmp_path, classifier, jpgs, caplog) -> None:
    """A share that mounts after the daemon started (or drops and comes back): the watch follows
    the folder now there, and the images of the folder underneath return without new work."""
    caplog.set_level(logging.INFO, logger="bcc_desk.watch")
    with watching(tmp_path, classifier) as w:
        shutil.copyfile(jpgs[0], w.root / "local.jpg")
        wait_for("the local image", lambda: all_done(w.state, {"local.jpg"}))
        local = rows(w.state)["local.jpg"]
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(w.root)],
                                               check=False, capture_output=True).returncode != 0:
            pytest.fail("this test mounts a tmpfs over the watched folder: run the tests as root (CI does)")
        try:
            wait_for("the new folder to be watched", lambda: caplog.text.count("watching ") >= 2)
            shutil.copyfile(jpgs[1], w.root / "on-share.jpg")
            wait_for("the image on the share", lambda: all_done(w.state, {"on-share.jpg"}))
            assert rows(w.state)["local.jpg"].state == VANISHED  # hidden under the mount
        finally:
            subprocess.run(["umount", "-l", str(w.root)], check=True)
        wait_for("the local image back", lambda: all_done(w.state, {"local.jpg"}))
        assert rows(w.state)["on-share.jpg"].state == VANISHED
        assert rows(w.state)["local.jpg"] == local  # restored as recorded, not classified again
    assert report_files(w.out) == ["local.jpg"]


# ---------------------------------------------------------------------------------------------
# The report


def test_a_report_open_in_excel_is_written_beside_then_back_in_place(tmp_path, classifier, jpgs) -> None:
    with watching(tmp_path, classifier) as w:
        shutil.copyfile(jpgs[0], w.root / "a.jpg")
        wait_for("the first report row", lambda: report_files(w.out) == ["a.jpg"])
        before = w.out.read_bytes()
        lock = w.out.with_name(f"~${w.out.name}")
        lock.write_bytes(b"\x05alice")  # Excel's owner file: the workbook is open
        shutil.copyfile(jpgs[1], w.root / "b.jpg")
        sibling = wait_for("a report beside the open one",
                           lambda: w.report.written if w.report.written not in (None, w.out) else None)
        wait_for("both rows beside", lambda: report_files(sibling) == ["a.jpg", "b.jpg"])
        shutil.copyfile(jpgs[2], w.root / "c.jpg")
        wait_for("the next row beside", lambda: report_files(sibling) == ["a.jpg", "b.jpg", "c.jpg"])
        assert w.out.read_bytes() == before  # Excel's copy untouched
        assert {p.name for p in w.out.parent.glob("report*.xlsx")} == {"report.xlsx", sibling.name}  # one sibling
        lock.unlink()  # Excel closed
        wait_for("the report back in place", lambda: report_files(w.out) == ["a.jpg", "b.jpg", "c.jpg"])


def test_a_read_only_report_folder_loses_no_row(tmp_path, classifier, jpgs, caplog) -> None:
    caplog.set_level(logging.INFO, logger="bcc_desk.watch")
    with watching(tmp_path, classifier) as w:
        w.report.FAILED_RETRY = 0.3
        shutil.copyfile(jpgs[0], w.root / "a.jpg")
        wait_for("the first report row", lambda: report_files(w.out) == ["a.jpg"])
        with read_only(w.out.parent):
            shutil.copyfile(jpgs[1], w.root / "b.jpg")
            wait_for("the image classified all the same", lambda: all_done(w.state, {"a.jpg", "b.jpg"}))
            wait_for("the failure said", lambda: "cannot write the report" in caplog.text)
            assert report_files(w.out) == ["a.jpg"]
        wait_for("the report once the folder is writable", lambda: report_files(w.out) == ["a.jpg", "b.jpg"])


# ---------------------------------------------------------------------------------------------
# The daemon as a user runs it


def _start(root: Path, out: Path, model: Path, env: dict, tag: str, tmp_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bcc_desk", "watch", str(root), "--out", str(out), "--model", str(model),
           "--settle", str(SETTLE)]
    with open(tmp_path / f"console-{tag}.txt", "wb") as console:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)


def _wait_up(proc: subprocess.Popen, log: Path, starts: int) -> None:
    def up() -> bool:
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}"
        return log.exists() and log.read_text().count("INFO ready") >= starts
    wait_for("the daemon to be ready (network compiled)", up, timeout=180)


@pytest.mark.slow
def test_the_daemon_killed_mid_stream_and_restarted_reports_every_image_once(
    tmp_path: Path, model: Path, jpgs, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # the default state location
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    root, out = tmp_path / "export", tmp_path / "report.xlsx"
    root.mkdir()
    state = default_state(root)
    assert str(state).startswith(str(tmp_path / "data"))
    images = jpgs[:60]
    names = [f"slide-{i % 3}/{f.name}" for i, f in enumerate(images)]

    def feed(start: int, stop: int) -> None:
        for name, f in zip(names[start:stop], images[start:stop]):
            (root / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(f, root / name)
            time.sleep(0.02)

    proc = _start(root, out, model, env, "1", tmp_path)
    try:
        _wait_up(proc, log_file(state), 1)
        feeder = threading.Thread(target=feed, args=(0, 40))
        feeder.start()
        wait_for("some images classified", lambda: sum(r.state == DONE for r in rows(state).values()) >= 10)
        proc.send_signal(signal.SIGKILL)  # a power cut, mid-stream
        proc.wait(10)
        feeder.join()
    finally:
        proc.kill()
    assert state.with_suffix(".lock").exists()  # a crash leaves the (unlocked) file; the restart takes it
    committed = {k: r for k, r in rows(state).items() if r.state == DONE}
    assert 10 <= len(committed) < len(images)
    ledger = Ledger(state)
    classified_at = {p.file: p.classified_at for p in ledger.predictions()}
    ledger.close()

    # While it is down: more images arrive, one is deleted, one is overwritten with another image.
    feed(40, 60)
    deleted, overwritten = sorted(committed)[:2]
    (root / deleted).unlink()
    (root / overwritten).write_bytes(jpgs[-1].read_bytes())
    expected = set(names) - {deleted}

    proc = _start(root, out, model, env, "2", tmp_path)
    try:
        _wait_up(proc, log_file(state), 2)
        wait_for("every image after the restart", lambda: all_done(state, expected), timeout=90)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0  # the batch in hand, the report, then out (how fast: not timed here)
        assert not state.with_suffix(".lock").exists()  # a clean stop leaves nothing behind
    finally:
        proc.kill()

    got = report_rows(out)
    files = [r["file"] for r in got]
    assert len(files) == len(set(files)) and set(files) == expected  # exactly once
    assert all(r["label"] in LABELS for r in got)
    final = rows(state)
    assert final[deleted].state == VANISHED
    assert final[overwritten].sha256 == sha256(jpgs[-1].read_bytes())
    ledger = Ledger(state)
    again = {p.file: p.classified_at for p in ledger.predictions()}
    ledger.close()
    unchanged = set(committed) - {deleted, overwritten}
    assert {f: again[f] for f in unchanged} == {f: classified_at[f] for f in unchanged}  # none twice
    run = dict(openpyxl.load_workbook(out, read_only=True)["Run"].iter_rows(min_row=2, values_only=True))
    assert run["finished"] != "still running" and run["mode"] == "bcc watch"
    assert log_file(state).read_text().count("stopped; ledger:") == 1  # the killed run never said so


def test_temporary_reports_a_killed_daemon_left_are_removed_at_the_next_start(tmp_path: Path, classifier: Classifier,
                                                                              caplog) -> None:
    """Issue #39: a daemon SIGKILLed mid-write left `.report.<random>.xlsx` beside the report for
    good.  The next start removes those (the workbook's and the PDF's), and nothing else."""
    reports = tmp_path / "reports"
    reports.mkdir()
    orphans = [reports / ".report.k3x_9q2a.xlsx", reports / ".report.a1b2c3d4.pdf"]
    kept = [reports / ".report.notes.xlsx", reports / "report.xlsx.bak", reports / ".other.k3x_9q2a.xlsx"]
    for f in orphans + kept:
        f.write_bytes(b"PK half a workbook")
    with caplog.at_level(logging.INFO, logger="bcc_desk.watch"), watching(tmp_path, classifier, pdf=True):
        pass
    assert [f for f in orphans if f.exists()] == [] and all(f.exists() for f in kept)
    [said] = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert ".report.k3x_9q2a.xlsx" in said and ".report.a1b2c3d4.pdf" in said


def test_the_watch_keeps_a_pdf_and_the_labs_identities_up_to_date(tmp_path: Path, classifier: Classifier, jpgs, caplog) -> None:
    """`bcc watch --pdf`: the PDF report is rewritten beside the workbook; slides.csv is read
    afresh for each write (a lab fills it in as slides arrive), and a bad one is said once while
    the reports go on."""
    from pypdf import PdfReader

    caplog.set_level(logging.INFO, logger="bcc_desk.watch")

    def slides_sheet() -> dict[str, dict]:
        ws = openpyxl.load_workbook(w.out)["Slides"]
        header = [c.value for c in ws[1]]
        return {r[0]: dict(zip(header, r)) for r in ws.iter_rows(min_row=2, values_only=True) if r[0]}

    def pdf_text() -> str:
        pdf = w.out.with_suffix(".pdf")
        return "".join(p.extract_text() for p in PdfReader(pdf).pages) if pdf.exists() else ""

    with watching(tmp_path, classifier, pdf=True) as w:
        (w.root / "slide-1").mkdir()
        for i, f in enumerate(jpgs[:6]):
            shutil.copyfile(f, w.root / "slide-1" / f"{i}.jpg")
        wait_for("six fields in the report", lambda: len(report_rows(w.out)) == 6)
        (w.root / "slides.csv").write_text("slide,patient_id\nslide-1,P-4711\n", encoding="utf-8")
        shutil.copyfile(jpgs[6], w.root / "slide-1" / "6.jpg")
        wait_for("the patient id in both reports", lambda: slides_sheet().get("slide-1", {}).get("patient id") == "P-4711"
                 and "P-4711" in pdf_text())
        assert "slide-1" in pdf_text()
        (w.root / "slides.csv").write_text("slide,patient_id\nslide-1,a\nslide-1,b\n", encoding="utf-8")
        shutil.copyfile(jpgs[7], w.root / "slide-1" / "7.jpg")
        wait_for("eight fields, the bad slides.csv ignored", lambda: len(report_rows(w.out)) == 8
                 and slides_sheet()["slide-1"]["patient id"] is None)
    said = [r for r in caplog.records if "a second time" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING  # once, not at every write


def test_usage_errors_stop_the_daemon_before_it_starts(tmp_path: Path, model: Path) -> None:
    runner = CliRunner()
    root = tmp_path / "export"
    result = runner.invoke(cli.app, ["watch", str(root)])
    assert result.exit_code == cli.EXIT_USAGE and "does not exist" in result.output

    root.mkdir()
    result = runner.invoke(cli.app, ["watch", str(root), "--out", str(tmp_path / "r.txt"), "--model", str(model)])
    assert result.exit_code == cli.EXIT_USAGE and "a report is .xlsx, .csv or .pdf" in result.output
    reports = tmp_path / "reports"
    reports.mkdir()
    with read_only(reports):
        result = runner.invoke(cli.app, ["watch", str(root), "--out", str(reports / "r.xlsx"), "--model", str(model)])
    assert result.exit_code == cli.EXIT_USAGE and "cannot write the report" in result.output

    state = tmp_path / "state" / "ledger.sqlite"
    held = lock_state(state)  # a daemon already running on this state
    try:
        result = runner.invoke(cli.app, ["watch", str(root), "--state", str(state), "--model", str(model)])
    finally:
        held.close()
    assert result.exit_code == cli.EXIT_USAGE and "already using the state file" in result.output

    Ledger(state, tmp_path).close()  # a ledger of another folder
    result = runner.invoke(cli.app, ["watch", str(root), "--state", str(state), "--model", str(model)])
    assert result.exit_code == cli.EXIT_USAGE and "belongs to the folder" in result.output


def test_a_second_daemon_on_the_same_folder_is_refused_whatever_its_state(tmp_path: Path, model: Path) -> None:
    """Issue #39: two daemons with different --state on one folder both ran, classifying every
    arrival twice into one report.  The folder's own lock refuses the second; released, it runs."""
    root = tmp_path / "export"
    root.mkdir()
    first = claim_watch(root)  # a daemon (or the app) already watching it with the default ledger
    try:
        result = CliRunner().invoke(cli.app, ["watch", str(root), "--state", str(tmp_path / "other" / "ledger.sqlite"),
                                              "--model", str(model)], env={"COLUMNS": "300"})
    finally:
        first.release()
    assert result.exit_code == cli.EXIT_USAGE, result.output
    assert f"already watching {root.resolve()}" in result.output
    assert not (tmp_path / "other" / "ledger.sqlite").exists()
    second = claim_watch(root, state=tmp_path / "other" / "ledger.sqlite")  # the folder free again: it may
    second.release()
    assert not list((tmp_path / "other").glob("*.lock"))
