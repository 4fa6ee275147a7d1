"""The desktop app driven like a user drives it: a real window (offscreen), real images, a real
small bundle, the real classifier in its worker thread, the xlsx read back with openpyxl."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import openpyxl
import pytest
from PySide6.QtCore import QMimeData, QPointF, QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QAction, QDropEvent, QKeySequence, QTextDocument
from PySide6.QtWidgets import QDialogButtonBox, QMessageBox, QTableWidget, QTableWidgetItem
from watchdog.utils import BaseThread

from bcc_desk.bundle import load_bundle
from bcc_desk.classify_process import ClassifierProcess
from bcc_desk.gui import MainWindow
from bcc_desk.gui.model_dialog import ModelDialog
from bcc_desk.gui.palette import ERROR_TEXT, FLAGGED_BACKGROUND
from bcc_desk.gui.slide_summary import TO_REVIEW_MARK
from bcc_desk.gui.table_model import CONFIDENCE, ERROR, FILE, LABEL, NEEDS_REVIEW, REVIEWER_LABEL, UNSURE_ROLE, review_sort_key
from bcc_desk.images import discover_images
from bcc_desk.lab_records import SLIDES_CSV, SlideIdentity, read_slides_csv
from bcc_desk.options import ClassifierOptions, RunSpec
from bcc_desk.paths import RESOURCES
from bcc_desk.prediction import REVIEW_DISAGREES
from bcc_desk.slides import disagrees_with_slide
from bcc_desk.verdict import DECISION_AID, slide_verdict
from bcc_desk.watch.ledger import DONE, Ledger
from bcc_desk.watch.report_writer import ReportWriter
from bcc_desk.watch.site import WatchTiming, default_state, lock_state

from bundles import CLASSES, LABELS, make_bundle
from folders import slide_folders, spread_images

RUN_TIMEOUT_MS = 60_000
WATCH_TIMEOUT_MS = 60_000


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("gui-model") / "atto", review_threshold=0.6)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, real_images) -> Path:
    """Three slide folders of real images (slide-10 checks natural order) and two bad files."""
    root = slide_folders(tmp_path_factory.mktemp("gui-slides") / "case 1", real_images, 4, ("slide-1", "slide-2", "slide-10"))
    good = next(iter(real_images.values()))[0].read_bytes()
    (root / "slide-10" / "=cut short.jpg").write_bytes(good[: len(good) // 3])
    return root


def _many(folder: Path, images: list[Path], n: int) -> Path:
    """n real images in 4 slide folders (hard links where the file system allows)."""
    return spread_images(folder, images, n, lambda k: f"slide-{k % 4}")


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory, all4) -> Path:
    images = sorted(all4.glob("*/*.jpg"))
    return _many(tmp_path_factory.mktemp("gui-big") / "big", images, 400)


@pytest.fixture(autouse=True)
def private_settings(tmp_path: Path, monkeypatch):
    """Whatever creates a default QSettings in a test writes under tmp_path, never to the
    user's real configuration; so do the watch's per-user ledgers."""
    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(fmt, QSettings.Scope.UserScope, str(tmp_path / "user-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user-data"))
    yield


@pytest.fixture()
def settings(tmp_path: Path) -> QSettings:
    return QSettings(str(tmp_path / "bcc-desk.ini"), QSettings.Format.IniFormat)


@pytest.fixture(scope="module")
def engine():
    """One classifier process for the module's windows (a window's own would import torch again,
    seconds on 2 cores); a test of the process's own life passes `engine=None`."""
    shared = ClassifierProcess()
    yield shared
    shared.close()


@pytest.fixture()
def make_window(qtbot, bundle: Path, settings: QSettings, engine: ClassifierProcess):
    def make(**kwargs) -> MainWindow:
        kwargs.setdefault("spec", RunSpec((bundle,), ClassifierOptions(device="cpu", compile=False)))
        kwargs.setdefault("engine", engine)
        window = MainWindow(settings=settings, ask_before_close=False, **kwargs)
        qtbot.addWidget(window)
        window.show()
        qtbot.waitExposed(window)
        return window

    return make


@pytest.fixture()
def window(make_window) -> MainWindow:
    return make_window()


def run(qtbot, window: MainWindow, folder: Path) -> bool:
    with qtbot.waitSignal(window.classification_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        window.open_folder(folder)
    return blocker.args[0]


@pytest.fixture()
def done(qtbot, window: MainWindow, slides: Path) -> MainWindow:
    assert run(qtbot, window, slides) is True
    return window


# ---------------------------------------------------------------------------------------------
# Opening and classifying


def test_the_desk_classifies_and_exports_without_a_window(qtbot, bundle: Path, slides: Path, settings: QSettings,
                                                          tmp_path: Path, engine) -> None:
    """#38: the run, the session and the export live in the Desk (no widget); a window only shows
    what its signals say."""
    from bcc_desk.gui.desk import Desk
    from bcc_desk.gui.settings import AppSettings

    desk = Desk(AppSettings(settings), RunSpec((bundle,), ClassifierOptions(device="cpu", compile=False)), confirm=lambda: True,
                engine=engine)
    arrived: list[int] = []
    desk.rows_arrived.connect(lambda predictions, replaced, first: arrived.append(len(predictions)))
    try:
        with qtbot.waitSignal(desk.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
            desk.open_folder(slides.resolve())
        completed, total, _ = finished.args
        assert completed and total == len(desk.session) == sum(arrived) and not desk.is_running()
        written = desk.export_report(tmp_path / "r.xlsx")
        assert written == tmp_path / "r.xlsx" and not desk.session.unexported_reviews
    finally:
        desk.shutdown()


def test_open_folder_classifies_every_image(qtbot, done: MainWindow, slides: Path) -> None:
    window = done
    expected = {p.relative_to(slides).as_posix() for p in discover_images(slides)}
    rows = window.predictions()
    assert {p.file for p in rows} == expected and window.model.rowCount() == len(expected)
    good = [p for p in rows if p.error is None]
    assert len(good) == len(expected) - 2 and {p.label for p in good} <= set(LABELS)
    bad = {p.file: p.error for p in rows if p.error is not None}
    assert "empty" in bad["slide-2/empty.jpg"] and "truncated" in bad["slide-10/=cut short.jpg"]
    assert {p.slide for p in rows} == {"slide-1", "slide-2", "slide-10"}
    # The window is idle again, shows what ran where, and the slide summary is filled in.
    assert not window.is_running() and not window.status_area.progress.isVisible()
    assert "cpu" in window.status_area.device_label.text()
    assert list(window.slides.summary.slides) == ["slide-1", "slide-2", "slide-10"]
    assert sum(s.images for s in window.slides.summary.slides.values()) == len(expected)
    assert window.slides.summary.table.rowCount() == 3
    assert f"{len(expected)} images" in window.status_area.counts_label.text()
    # The first row is selected and shown large; thumbnails arrive for the rows on screen.
    qtbot.waitUntil(lambda: window.image_pane.view.has_image(), timeout=10_000)
    qtbot.waitUntil(lambda: len(window.thumbnails) > 0, timeout=10_000)


def test_sort_by_columns_and_flagged_first(done: MainWindow) -> None:
    window = done
    window.table.sortByColumn(CONFIDENCE, Qt.SortOrder.DescendingOrder)
    conf = [p.confidence if p.confidence is not None else -1 for p in window.visible_predictions()]
    assert conf == sorted(conf, reverse=True)
    window.table.sortByColumn(FILE, Qt.SortOrder.AscendingOrder)
    files = [p.file.casefold() for p in window.visible_predictions()]
    assert files == sorted(files)
    window.flagged_first()
    shown = window.visible_predictions()
    assert [review_sort_key(p) for p in shown] == sorted(review_sort_key(p) for p in shown)
    assert window.table.horizontalHeader().sortIndicatorSection() == NEEDS_REVIEW
    flagged = [p.needs_review for p in shown if p.error is None]
    assert flagged == sorted(flagged, reverse=True)  # every flagged image before the others
    assert all(p.error is not None for p in shown[-2:])  # unreadable (flagged too, but not labellable) last
    assert window.table.currentIndex().row() == 0


def test_each_filter(done: MainWindow) -> None:
    window = done
    rows = window.predictions()
    label = next(p.label for p in rows if p.label)
    window.filters.set_filters(label=label)
    assert window.visible_predictions() and all(p.label == label for p in window.visible_predictions())
    assert len(window.visible_predictions()) == sum(p.label == label for p in rows)
    window.filters.set_filters(slide="slide-10")
    assert {p.slide for p in window.visible_predictions()} == {"slide-10"}
    assert len(window.visible_predictions()) == sum(p.slide == "slide-10" for p in rows)
    window.filters.set_filters(flagged_only=True)
    assert len(window.visible_predictions()) == sum(p.needs_review for p in rows)
    window.filters.set_filters(errors_only=True)
    assert {p.file for p in window.visible_predictions()} == {"slide-2/empty.jpg", "slide-10/=cut short.jpg"}
    window.filters.set_filters(search="CUT SH")
    assert [p.file for p in window.visible_predictions()] == ["slide-10/=cut short.jpg"]
    window.filters.set_filters(slide="slide-1", search="benign")
    assert all(p.slide == "slide-1" and "benign" in p.file.lower() for p in window.visible_predictions())
    assert "shown" in window.filters.shown_label.text()
    window.clear_filters()
    assert len(window.visible_predictions()) == len(rows)


# ---------------------------------------------------------------------------------------------
# Review and export


def test_review_by_keys_and_by_api(qtbot, done: MainWindow) -> None:
    window = done
    window.table.sortByColumn(FILE, Qt.SortOrder.AscendingOrder)
    window.table.selectRow(0)
    window.table.setFocus()
    first, second = window.visible_predictions()[:2]
    qtbot.keyClick(window.table, Qt.Key.Key_2)
    review = window.reviews()[first.path]
    assert review.label == LABELS[1] and review.by == window.settings.reviewer and review.at is not None
    assert window.table.currentIndex().row() == 1  # moved on to the next image
    qtbot.keyClick(window.table, Qt.Key.Key_4)
    assert window.reviews()[second.path].label == LABELS[3]
    qtbot.keyClick(window.table, Qt.Key.Key_Up)  # arrows move, as everywhere
    qtbot.keyClick(window.table, Qt.Key.Key_0)  # 0 clears
    assert second.path not in window.reviews()
    # The image pane shows the review, and the slide summary counts the reviewed label.
    window.table.selectRow(0)
    assert LABELS[1] in window.image_pane.info.text()
    qtbot.waitUntil(lambda: sum(s.reviewed for s in window.slides.summary.slides.values()) == 1, timeout=5_000)
    # By API: a file as the table shows it, or an absolute path.
    window.set_review("slide-1/" + next(p.path.name for p in window.predictions() if p.slide == "slide-1"), LABELS[0])
    window.set_review(second.path, LABELS[2])
    assert window.reviews()[second.path].label == LABELS[2]
    with pytest.raises(ValueError):
        window.set_review(second.path, "Leukaemia")
    with pytest.raises(KeyError):
        window.set_review("no/such.jpg", LABELS[0])
    # The review buttons of the image pane do the same as the keys.
    window.table.selectRow(3)
    target = window.visible_predictions()[3]
    window.image_pane._review_buttons[2].click()
    assert window.reviews()[target.path].label == LABELS[2]


def test_export_holds_model_and_reviewer_labels(done: MainWindow, tmp_path: Path) -> None:
    window = done
    rows = window.predictions()
    reviewed = [p for p in rows if p.error is None][:3]
    for p, label in zip(reviewed, (LABELS[0], LABELS[3], LABELS[2])):
        window.set_review(p.file, label)
    written = window.export_report(tmp_path / "review.xlsx")
    assert written == tmp_path / "review.xlsx"
    wb = openpyxl.load_workbook(written)
    assert wb.sheetnames == ["Images", "Slides", "Run"]
    ws = wb["Images"]
    header = [c.value for c in ws[1]]
    for column in ("label", "reviewer label", "reviewed by", "reviewed at"):
        assert column in header
    table = {r[header.index("file")]: dict(zip(header, r)) for r in ws.iter_rows(min_row=2, values_only=True)}
    assert set(table) == {p.file for p in rows}
    for p, label in zip(reviewed, (LABELS[0], LABELS[3], LABELS[2])):
        row = table[p.file]
        assert row["label"] == p.label and row["reviewer label"] == label
        assert row["reviewed by"] == window.settings.reviewer and row["reviewed at"] is not None
    untouched = next(p for p in rows if p not in reviewed)
    assert table[untouched.file]["reviewer label"] is None and table[untouched.file]["reviewed by"] is None
    assert table["slide-10/=cut short.jpg"]["error"]  # the formula-like name stayed text
    run_sheet = {r[0]: r[1] for r in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert run_sheet["reviewed images"] == "3" and "bcc-desk" in run_sheet["front end"]
    assert run_sheet["device"].startswith("cpu") and run_sheet["model"] == rows[0].model
    # CSV too, by the suffix.
    csv_path = window.export_report(tmp_path / "review.csv")
    assert "reviewer label" in csv_path.read_text(encoding="utf-8-sig").splitlines()[0]


# ---------------------------------------------------------------------------------------------
# Cancel, responsiveness


def test_cancel_mid_run_leaves_a_usable_window(qtbot, window: MainWindow, big_folder: Path, slides: Path) -> None:
    window.rows_added.connect(lambda n: window.cancel())
    with qtbot.waitSignal(window.classification_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        window.open_folder(big_folder)
    assert blocker.args == [False]
    done = window.model.rowCount()
    assert 0 < done < 400 and not window.is_running()
    assert "Stopped after" in window.statusBar().currentMessage()
    # Still usable: export what was done, then classify another folder to the end.
    window.rows_added.disconnect()
    assert window.export_report(big_folder.parent / "partial.xlsx").exists()
    assert run(qtbot, window, slides) is True
    assert window.model.rowCount() == len(discover_images(slides))


def test_ui_thread_keeps_ticking_while_classifying(qtbot, window: MainWindow, big_folder: Path) -> None:
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    try:
        assert run(qtbot, window, big_folder) is True
    finally:
        timer.stop()
    assert window.model.rowCount() == 400 and len(ticks) > 5
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    assert longest < 2.0, f"the UI thread stalled for {longest:.2f} s"


def test_opening_another_folder_while_running_switches_to_it(qtbot, window: MainWindow, big_folder: Path,
                                                             slides: Path) -> None:
    finished: list[bool] = []
    window.classification_finished.connect(finished.append)
    window.open_folder(big_folder)
    qtbot.waitSignal(window.rows_added, timeout=RUN_TIMEOUT_MS).wait()
    window.open_folder(slides)
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=RUN_TIMEOUT_MS)
    assert finished == [False, True] and window.root == slides.resolve()
    assert window.model.rowCount() == len(discover_images(slides))


@pytest.mark.slow
def test_a_crash_of_the_classifier_process_is_one_message_and_keeps_the_rows(qtbot, window: MainWindow,
                                                                            big_folder: Path, slides: Path) -> None:
    """The network runs in a process of its own: killed mid-run (as the system does when memory
    runs out), it costs one message, the rows done stay, and the next run starts a new one."""
    messages: list[str] = []
    window.error_shown.connect(messages.append)

    def kill_once(_n: int) -> None:
        if window.desk.engine.pid is not None and not messages:
            os.kill(window.desk.engine.pid, signal.SIGKILL)

    window.rows_added.connect(kill_once)
    with qtbot.waitSignal(window.classification_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        window.open_folder(big_folder)
    window.rows_added.disconnect(kill_once)
    kept = window.model.rowCount()
    assert blocker.args == [False] and 0 < kept < 400
    assert len(messages) == 1 and "stopped unexpectedly" in messages[0] and f"the {kept} images" in messages[0]
    assert window.export_report(big_folder.parent / "after-crash.xlsx").exists()
    assert run(qtbot, window, slides) is True
    assert window.model.rowCount() == len(discover_images(slides)) and len(messages) == 1


@pytest.mark.slow
def test_the_classifier_process_ends_with_the_window(qtbot, make_window, slides: Path) -> None:
    window = make_window(engine=None)  # its own process, as the app's
    assert run(qtbot, window, slides) is True
    pid = window.desk.engine.pid
    assert pid is not None
    window.close()
    qtbot.waitUntil(lambda: not Path(f"/proc/{pid}").exists()
                    or "State:\tZ" in Path(f"/proc/{pid}/status").read_text(), timeout=30_000)


# ---------------------------------------------------------------------------------------------
# Watching the folder: bcc watch's watcher and ledger, rows live in the table


@pytest.fixture()
def watched(tmp_path: Path, real_images) -> Path:
    """A fresh folder per test (the watch writes its report into it): two slides, four images."""
    return slide_folders(tmp_path / "camera export", real_images, 1, ("slide-1", "slide-2"), empty_file=False).resolve()


def start_watching(qtbot, window: MainWindow, folder: Path) -> None:
    """Open and classify `folder`, then turn the toggle on as a click does (fast settings)."""
    assert run(qtbot, window, folder) is True
    window.desk.watch_timing = WatchTiming(settle=0.3, quiet=0.2)
    assert window.menus.watch_action.isEnabled() and not window.menus.watch_action.isChecked()
    window.menus.watch_action.trigger()
    assert window.menus.watch_action.isChecked() and window.is_watching()


def ledger_outcomes(state: Path) -> dict:
    """file -> (state, sha256, classified_at) as the watch's ledger has them."""
    if not state.exists():
        return {}
    ledger = Ledger(state)
    try:
        at = {p.file: p.classified_at for p in ledger.predictions()}
        return {rel: (row.state, row.sha256, at.get(rel)) for rel, row in ledger.rows().items()}
    finally:
        ledger.close()


def shown_as_in_ledger(window: MainWindow, state: Path) -> bool:
    """Every image is done in the ledger, and the table shows each with the ledger's outcome."""
    outcomes = ledger_outcomes(state)
    table = {p.file: p.classified_at for p in window.predictions()}
    return bool(outcomes) and all(s == DONE and table.get(f) == at for f, (s, _, at) in outcomes.items())


def watch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if isinstance(t, BaseThread) or t.name == ReportWriter.THREAD]


def test_watching_shows_arriving_images_live_and_records_them(qtbot, window: MainWindow, watched: Path,
                                                               real_images) -> None:
    start_watching(qtbot, window, watched)
    state = default_state(watched)
    assert "user-data" in state.parts  # the per-user ledger (the tests' own user data folder)
    before = {p.file for p in window.predictions()}
    # A new slide folder with a new image, and a copy of an image already there.
    new = watched / "slide-3" / "arrived.jpg"
    new.parent.mkdir()
    shutil.copy(real_images[CLASSES[1]][1], new)
    original = watched / "slide-1" / real_images[CLASSES[0]][0].name
    copy = watched / "slide-2" / "copy of it.jpg"
    shutil.copy(original, copy)
    qtbot.waitUntil(lambda: all((row := window.model.row_of(p)) is not None and window.model.prediction(row).label
                                for p in (new, copy)), timeout=WATCH_TIMEOUT_MS)
    assert "Watching" in window.status_area.watch_label.text() and window.status_area.watch_label.isVisible()
    # The ledger has them done; every row (the ones re-recorded at the start included) is the
    # ledger's outcome, and no image has two rows.
    qtbot.waitUntil(lambda: shown_as_in_ledger(window, state), timeout=WATCH_TIMEOUT_MS)
    outcomes = ledger_outcomes(state)
    assert set(outcomes) == before | {"slide-3/arrived.jpg", "slide-2/copy of it.jpg"}
    assert outcomes["slide-3/arrived.jpg"][0] == DONE
    files = [p.file for p in window.predictions()]
    assert len(files) == len(set(files)) == len(before) + 2
    by_file = {p.file: p for p in window.predictions()}
    assert by_file["slide-2/copy of it.jpg"].label == by_file[f"slide-1/{original.name}"].label
    qtbot.waitUntil(lambda: "slide-3" in window.slides.summary.slides, timeout=5_000)
    assert window.filters.slide_filter.findData("slide-3") >= 0
    # A file written again with other content: its row is updated, still one row.
    content = real_images[CLASSES[3]][2].read_bytes()
    original.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    rel = f"slide-1/{original.name}"
    qtbot.waitUntil(lambda: ledger_outcomes(state)[rel][:2] == (DONE, digest) and shown_as_in_ledger(window, state),
                    timeout=WATCH_TIMEOUT_MS)
    assert window.model.rowCount() == len(before) + 2
    # Exporting the reviews never goes over the watch's report (it is rewritten from the ledger).
    assert window.desk.default_report_path() == watched / "bcc-review.xlsx"
    with pytest.raises(ValueError, match="watch's report"):
        window.export_report(watched / "bcc-report.xlsx")


def run_sheet(workbook: Path) -> dict:
    return dict(openpyxl.load_workbook(workbook, read_only=True)["Run"].iter_rows(min_row=2, values_only=True))


def test_an_empty_folder_watched_and_exported_records_the_model_that_classified(
    qtbot, window: MainWindow, bundle: Path, tmp_path: Path, real_images
) -> None:
    """Nothing to classify at first, then images arrive under the watch: the export's Run sheet
    names the watch's model, its classes in output order, its threshold and OOD check."""
    empty = tmp_path / "empty export"
    empty.mkdir()
    assert run(qtbot, window, empty) is False  # "no images found"
    window.desk.watch_timing = WatchTiming(settle=0.3, quiet=0.2)
    window.menus.watch_action.trigger()
    assert window.is_watching()
    (empty / "slide-1").mkdir()
    shutil.copy(real_images[CLASSES[2]][0], empty / "slide-1" / "arrived.jpg")
    qtbot.waitUntil(lambda: window.model.rowCount() == 1 and window.predictions()[0].label is not None,
                    timeout=WATCH_TIMEOUT_MS)
    sheet = run_sheet(window.export_report(tmp_path / "review.xlsx"))
    meta = load_bundle(bundle).meta
    assert sheet["model"] == meta.name and sheet["model sha256"] == meta.weights_sha256
    assert sheet["classes"] == "; ".join(meta.labels)
    assert sheet["review threshold"] == pytest.approx(meta.review_threshold) and meta.review_threshold > 0
    assert sheet["out-of-distribution check"] == ("on" if meta.ood is not None else "off")
    assert sheet["device"].startswith("cpu")


def test_switching_the_model_while_watching_records_the_new_one(
    qtbot, window: MainWindow, watched: Path, tmp_path: Path, real_images
) -> None:
    start_watching(qtbot, window, watched)
    second = make_bundle(tmp_path / "second", seed=1, review_threshold=0.8)
    with qtbot.waitSignal(window.watch_stopped, timeout=30_000):
        window.set_spec(RunSpec((second,), ClassifierOptions(device="cpu", tta=True, compile=False)))  # the watch goes on
    qtbot.waitUntil(lambda: window.is_watching() and "Watching" in window.status_area.watch_label.text(),
                    timeout=WATCH_TIMEOUT_MS)
    new = watched / "slide-1" / "after the switch.jpg"
    shutil.copy(real_images[CLASSES[3]][1], new)
    qtbot.waitUntil(lambda: (row := window.model.row_of(new)) is not None
                    and window.model.prediction(row).label is not None, timeout=WATCH_TIMEOUT_MS)
    meta = load_bundle(second).meta
    assert window.model.prediction(window.model.row_of(new)).model == meta.name
    sheet = run_sheet(window.export_report(tmp_path / "review.xlsx"))
    assert sheet["model"] == meta.name and sheet["model sha256"] == meta.weights_sha256
    assert sheet["review threshold"] == pytest.approx(0.8) and sheet["test-time augmentation"] == "on"


def test_turning_the_watch_off_stops_it_and_the_window_closes_cleanly(qtbot, make_window, settings: QSettings,
                                                                       watched: Path, real_images) -> None:
    window = make_window()
    start_watching(qtbot, window, watched)
    new = watched / "slide-1" / "late.jpg"
    shutil.copy(real_images[CLASSES[2]][3], new)
    qtbot.waitUntil(lambda: window.model.row_of(new) is not None, timeout=WATCH_TIMEOUT_MS)
    with qtbot.waitSignal(window.watch_stopped, timeout=30_000):
        window.menus.watch_action.trigger()  # off
    assert not window.menus.watch_action.isChecked() and not window.is_watching() and window.desk.watch_thread is None
    assert not window.status_area.watch_label.isVisible() and window.menus.watch_action.isEnabled()
    assert watch_threads() == []  # observer, emitters, report writer: all gone
    lock_state(default_state(watched)).close()  # the ledger's lock is free again
    run_sheet = dict(openpyxl.load_workbook(watched / "bcc-report.xlsx", read_only=True)["Run"]
                     .iter_rows(min_row=2, values_only=True))
    assert run_sheet["mode"] == "bcc-desk" and run_sheet["finished"] != "still running"  # finalised
    assert settings.value("watch/folder", "") == ""
    # On again, then the window closed while watching: the watch ends with it, and the folder is
    # watched again when it is next opened.
    window.menus.watch_action.trigger()
    assert window.is_watching()
    window.close()
    assert not window.isVisible() and window.desk.watch_thread is None and watch_threads() == []
    assert settings.value("watch/folder") == str(watched)
    again = make_window()
    again.desk.watch_timing = WatchTiming(settle=0.3)
    assert run(qtbot, again, watched) is True
    assert again.is_watching() and again.menus.watch_action.isChecked()
    with qtbot.waitSignal(again.watch_stopped, timeout=30_000):
        again.set_watching(False)
    assert watch_threads() == []


def test_a_ledger_in_use_by_bcc_watch_is_one_message_and_the_toggle_off(qtbot, window: MainWindow,
                                                                        watched: Path) -> None:
    messages: list[str] = []
    window.error_shown.connect(messages.append)
    assert run(qtbot, window, watched) is True
    held = lock_state(default_state(watched))  # a bcc watch daemon running on the same folder
    try:
        window.menus.watch_action.trigger()
    finally:
        held.close()
    assert not window.menus.watch_action.isChecked() and not window.is_watching() and window.desk.watch_thread is None
    assert len(messages) == 1 and "already watching" in messages[0] and str(watched) in messages[0]
    assert window.menus.watch_action.isEnabled() and watch_threads() == []


# ---------------------------------------------------------------------------------------------
# Image pane, model picker, settings, opening by drop


def test_grad_cam_overlay_toggles(qtbot, done: MainWindow) -> None:
    window = done
    pane = window.image_pane
    window.table.selectRow(0)
    qtbot.waitUntil(pane.view.has_image, timeout=10_000)
    with qtbot.waitSignal(pane.cam_shown, timeout=30_000):
        pane.cam_toggle.setChecked(True)
    assert pane.view.overlay_visible() and "looked" in pane.cam_status.text()
    pane.cam_toggle.setChecked(False)
    assert not pane.view.overlay_visible()
    before = pane.view.zoom_factor()
    pane.view.zoom(2.0)
    assert pane.view.zoom_factor() == pytest.approx(before * 2)
    # Probabilities of every class are shown for the image.
    assert pane.bars._probs.keys() == set(LABELS)


def _pane_text(window: MainWindow) -> str:
    """The image pane's text as the user reads it (its rich text rendered to plain)."""
    doc = QTextDocument()
    doc.setHtml(window.image_pane.info.text())
    return doc.toPlainText()


def _select_file(window: MainWindow, file: str) -> int:
    """Select the row of `file` as a click does; its row in the view."""
    row = [p.file for p in window.visible_predictions()].index(file)
    window.table.selectRow(row)
    window.table.setFocus()
    return row


def test_headers_say_whose_word_each_column_is(window: MainWindow) -> None:
    header = {c: window.proxy.headerData(c, Qt.Orientation.Horizontal) for c in range(window.proxy.columnCount())}
    assert header[LABEL] == "Model label" and header[NEEDS_REVIEW] == "Needs review"
    assert header[REVIEWER_LABEL] == "Reviewer's label" and header[ERROR] == "Error"
    assert "model's flag" in window.proxy.headerData(NEEDS_REVIEW, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)


def test_unreadable_image_shows_its_reason_and_cannot_be_labelled(qtbot, done: MainWindow) -> None:
    window = done
    pane = window.image_pane
    window.table.sortByColumn(FILE, Qt.SortOrder.AscendingOrder)
    bad = next(p for p in window.predictions() if p.file == "slide-2/empty.jpg")
    row = _select_file(window, bad.file)
    # The model-label column (on screen, unlike the Error column far right) says why, in red.
    cell = window.proxy.index(row, LABEL)
    assert cell.data() == f"Unreadable: {bad.error}" and "empty" in cell.data()
    assert cell.data(Qt.ItemDataRole.ForegroundRole) == ERROR_TEXT
    assert bad.error in cell.data(Qt.ItemDataRole.ToolTipRole)
    assert window.table.visualRect(cell).right() < window.table.viewport().width()
    assert cell.data() in _pane_text(window)
    qtbot.waitUntil(lambda: "cannot show" in pane.view._message.toPlainText(), timeout=10_000)
    # It cannot be given a class: the actions, their keys and the pane's buttons are off.
    assert window.menus.review_actions and not any(a.isEnabled() for a in window.menus.review_actions)
    assert pane.class_buttons and not any(b.isEnabled() for b in pane.class_buttons)
    qtbot.keyClick(window.table, Qt.Key.Key_2)
    assert bad.path not in window.reviews()
    with pytest.raises(ValueError, match="unreadable"):
        window.set_review(bad.path, window.classes[0])
    # A readable image again: everything back on, and the keys work.
    good = next(p for p in window.visible_predictions() if p.error is None)
    _select_file(window, good.file)
    assert all(a.isEnabled() for a in window.menus.review_actions) and all(b.isEnabled() for b in pane.class_buttons)
    qtbot.keyClick(window.table, Qt.Key.Key_2)
    assert window.reviews()[good.path].label == window.classes[1]
    # A selection that takes in unreadable images labels only the readable ones.
    window.table.selectAll()
    window.review_selected(window.classes[3])
    labelled = window.reviews()
    assert all(labelled[p.path].label == window.classes[3] for p in window.predictions() if p.error is None)
    assert not any(p.path in labelled for p in window.predictions() if p.error is not None)


def test_class_names_are_written_one_way_everywhere(done: MainWindow) -> None:
    """The classifier's class names, unchanged, in the table, the image pane, the review
    actions and buttons, the class filter and the slide summary."""
    window = done
    classes = window.classes
    assert classes == LABELS  # the classifier's names: what every front end calls the classes
    for view_row, p in enumerate(window.visible_predictions()):
        window.table.selectRow(view_row)
        in_table = window.proxy.index(view_row, LABEL).data()
        in_pane = _pane_text(window).splitlines()[0]
        if p.error is None:
            assert in_table == p.label and in_pane.startswith(f"Model: {in_table} (")
        else:
            assert in_pane == in_table
    assert [a.text() for a in window.menus.review_actions] == [f"Reviewed as {c}" for c in classes]
    assert [b.text() for b in window.image_pane.class_buttons] == [f"{i + 1} {c}" for i, c in enumerate(classes)]
    assert [window.filters.class_filter.itemText(i) for i in range(1, window.filters.class_filter.count())] == classes
    summary = window.slides.summary.table
    headers = [summary.horizontalHeaderItem(c).text() for c in range(summary.columnCount())]
    assert all(c in headers for c in classes)
    reviewed = next(p for p in window.predictions() if p.error is None)
    window.set_review(reviewed.path, classes[2])
    row = window.visible_predictions().index(reviewed)
    assert window.proxy.index(row, REVIEWER_LABEL).data() == classes[2]


def test_help_lists_every_shortcut_and_links_the_documentation(qtbot, window: MainWindow) -> None:
    window.menus.shortcuts_action.trigger()
    dialog = window.menus.shortcuts_dialog
    assert dialog is not None and dialog.isVisible()
    table = dialog.findChild(QTableWidget, "shortcuts")
    listed = {(table.item(r, 0).text(), table.item(r, 1).text()) for r in range(table.rowCount())}
    native = QKeySequence.SequenceFormat.NativeText
    for i, c in enumerate(window.classes):
        assert (str(i + 1), f"Reviewed as {c}") in listed
    assert ("0", "Clear the reviewed label") in listed
    assert (QKeySequence(QKeySequence.StandardKey.Open).toString(native), "Open folder") in listed
    assert ("F5", "Classify again") in listed and any(keys == "G" for keys, _ in listed)  # Grad-CAM
    # Built from the window's own actions: every key any of them has is in the list.
    keys = {k.toString(native) for a in window.findChildren(QAction) for k in a.shortcuts()}
    assert keys and keys <= {k for k, _ in listed}
    dialog.close()
    # About: where the documentation is, as a link to the README shipped with the app.
    window.menus.about_action.trigger()
    box = window.menus.about_box
    assert box is not None and box.isVisible()
    assert "Documentation: README.md in the installation folder" in box.text()
    readme = RESOURCES.parent / "README.md"
    assert readme.is_file() and f'href="{QUrl.fromLocalFile(str(readme)).toString()}"' in box.text()
    box.close()


def test_model_dialog_shows_metadata_and_builds_an_ensemble(qtbot, bundle: Path, tmp_path: Path) -> None:
    second = make_bundle(tmp_path / "second", seed=1)
    dialog = ModelDialog(RunSpec((bundle,)), known=[second])
    qtbot.addWidget(dialog)
    folders = dialog.listed_folders()
    assert bundle.resolve() in folders and second.resolve() in folders
    dialog.list.setCurrentRow(folders.index(bundle.resolve()))
    html = dialog.details.toHtml()
    assert "test-convnext_atto-0" in html and "val_macro_f1" in html and "50.0%" in html
    item = dialog.list.item(folders.index(second.resolve()))
    item.setCheckState(Qt.CheckState.Checked)
    dialog.tta.setChecked(True)
    dialog.own_threshold.setChecked(False)
    dialog.threshold.setValue(75)
    assert dialog.slide_consensus.isChecked()  # on unless a lab's folders mix patients
    dialog.slide_consensus.setChecked(False)
    spec = dialog.spec()
    assert set(spec.model_dirs) == {bundle.resolve(), second.resolve()}
    assert spec.options.tta and spec.options.review_threshold == pytest.approx(0.75)
    assert not spec.options.slide_consensus


def test_ensemble_with_tta_runs(qtbot, make_window, bundle: Path, slides: Path, tmp_path: Path) -> None:
    second = make_bundle(tmp_path / "second", seed=1)
    window = make_window(spec=RunSpec((bundle, second), ClassifierOptions(device="cpu", tta=True, review_threshold=0.9,
                                                                          compile=False)))
    assert "ensemble" in window.status_area.model_label.text() and "TTA" in window.status_area.model_label.text()
    assert run(qtbot, window, slides) is True
    good = [p for p in window.predictions() if p.error is None]
    assert all("+" in p.model for p in good)
    # Flagged below the threshold given, or where the image disagrees with its slide folder.
    disagree = disagrees_with_slide([p.slide for p in good], [p.label for p in good])
    assert [p.needs_review for p in good] == [p.confidence < 0.9 or d for p, d in zip(good, disagree, strict=True)]
    # The confidence bar is amber exactly where the image is flagged for low confidence.
    proxy = window.proxy
    amber = {proxy.index(r, FILE).data(): proxy.index(r, CONFIDENCE).data(UNSURE_ROLE) for r in range(proxy.rowCount())}
    assert {p.file: p.error is None and p.confidence < 0.9 for p in window.predictions()} == amber


def test_settings_are_remembered(qtbot, make_window, settings: QSettings, bundle: Path, slides: Path) -> None:
    window = make_window()
    window.set_spec(RunSpec((bundle,), ClassifierOptions(device="cpu", tta=True, review_threshold=0.8, slide_consensus=False)),
                      remember=True)
    assert run(qtbot, window, slides) is True
    assert window.session.run_info.slide_review_threshold is None  # the Run sheet says it was off
    assert [p.needs_review for p in window.predictions()] == [p.error is not None or p.confidence < 0.8
                                                               for p in window.predictions()]
    window.slides.hide()  # the layout is part of what is remembered
    window.close()
    again = make_window(spec=None)
    assert again.spec.model_dirs == (bundle,) and again.spec.options.tta and again.spec.options.review_threshold == 0.8
    assert not again.spec.options.slide_consensus
    assert again.settings.recent_folders[0] == str(slides.resolve())
    assert again.settings.last_folder == str(slides.resolve())
    assert again.slides.isHidden()
    assert all(settings.value(f"window/{k}") is not None for k in ("geometry", "state", "splitter"))
    again.menus.recent_menu.aboutToShow.emit()
    assert str(slides.resolve()) in [a.text() for a in again.menus.recent_menu.actions()]


def test_dropping_a_folder_opens_it(qtbot, window: MainWindow, slides: Path) -> None:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(slides))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignal(window.classification_finished, timeout=RUN_TIMEOUT_MS):
        window.dropEvent(event)
    assert window.root == slides.resolve() and window.model.rowCount() > 0


def test_a_bad_model_is_a_message_not_a_crash(qtbot, make_window, slides: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(make_bundle(tmp_path / "ok"), broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    messages: list[str] = []
    window = make_window(spec=RunSpec((broken,), ClassifierOptions(device="cpu", compile=False)))
    window.error_shown.connect(messages.append)
    assert run(qtbot, window, slides) is False
    assert messages and "sha256" in messages[-1]
    with pytest.raises(FileNotFoundError):
        window.open_folder(tmp_path / "missing")


def test_command_line_and_light_import(tmp_path: Path) -> None:
    from bcc_desk.gui.app import main, parse_args

    args = parse_args([str(tmp_path), "--model", "a", "-m", "b"])
    assert args.folder == tmp_path and args.model == [Path("a"), Path("b")]
    assert main([str(tmp_path / "missing")]) == 2
    # The core and the CLI never import Qt; `import bcc_desk.gui` alone does not either.
    code = ("import sys, bcc_desk.cli, bcc_desk.classifier, bcc_desk.report, bcc_desk.gui; "
            "sys.exit(any(m.startswith('PySide6') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.slow
def test_the_apps_own_process_never_loads_torch_to_classify_or_watch(bundle: Path, slides: Path, tmp_path: Path,
                                                                     real_images) -> None:
    """The network runs in the classifier process: the window's process stays small (torch alone
    is ~500 MB) through opening a folder, classifying it, watching it while an image arrives,
    reviewing and exporting."""
    folder = tmp_path / "slides"
    shutil.copytree(slides, folder)
    arrived = folder / "slide-1" / "arrived.jpg"
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f"""
        import shutil, sys
        from pathlib import Path
        from PySide6.QtCore import QEventLoop, QSettings, QTimer
        from PySide6.QtWidgets import QApplication
        from bcc_desk.gui import MainWindow
        from bcc_desk.options import ClassifierOptions, RunSpec
        from bcc_desk.watch.site import WatchTiming

        def wait_until(ready):
            loop = QEventLoop()
            timer = QTimer(interval=50)
            timer.timeout.connect(lambda: ready() and loop.quit())
            timer.start()
            QTimer.singleShot(300_000, loop.quit)
            loop.exec()
            return ready()

        if __name__ == "__main__":
            app = QApplication([])
            window = MainWindow(spec=RunSpec((Path({str(bundle)!r}),), ClassifierOptions(device="cpu")), ask_before_close=False,
                                settings=QSettings({str(tmp_path / "s.ini")!r}, QSettings.Format.IniFormat))
            window.show()
            finished = []
            window.classification_finished.connect(finished.append)
            window.open_folder({str(folder)!r})
            wait_until(lambda: finished)
            window.desk.watch_timing = WatchTiming(settle=0.3, quiet=0.2)
            window.set_watching(True)
            wait_until(lambda: "Watching" in window.status_area.watch_label.text())
            shutil.copy({str(real_images[CLASSES[2]][0])!r}, {str(arrived)!r})
            arrived = Path({str(arrived)!r})
            watched = wait_until(lambda: (row := window.model.row_of(arrived)) is not None
                                 and window.model.prediction(row).label is not None)
            stopped = []
            window.watch_stopped.connect(lambda: stopped.append(True))
            window.set_watching(False)
            wait_until(lambda: stopped)
            window.set_review(0, window.classes[1])
            window.export_report({str(tmp_path / "r.xlsx")!r})
            window.close()
            print(finished, watched, len(window.predictions()), [m for m in ("torch", "timm") if m in sys.modules])
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.split("\n")[-2] == f"[True] True {len(discover_images(slides)) + 1} []"
    assert (tmp_path / "r.xlsx").exists() and (folder / "bcc-report.xlsx").exists()  # the review, the watch's report


def test_qt_calls_cannot_free_none() -> None:
    """PySide6 6.12 drops a reference to None on every void call on CPython < 3.12; without
    `refcount_guard` these calls abort the interpreter ("none_dealloc")."""
    from PySide6.QtCore import QObject

    obj = QObject()
    for _ in range(300_000):
        obj.setObjectName("x")
        obj.blockSignals(False)
    if sys.version_info < (3, 12):
        assert min(sys.getrefcount(x) for x in (None, True, False)) > 2**39


def test_the_image_pane_follows_a_flag_judged_again_as_the_slide_grows(qtbot, done: MainWindow) -> None:
    """The selected field's pane says why it is flagged as its slide now stands: when more fields
    of another label join the slide (a camera still exporting), the field disagrees with it."""
    window = done
    row = next(r for r in range(len(window.session)) if window.session.prediction(r).error is None
               and window.session.prediction(r).slide == "slide-1")
    p = window.session.prediction(row)
    window.table.selectRow(window.proxy.mapFromSource(window.model.index(row, 0)).row())
    assert window.image_pane.prediction is p and REVIEW_DISAGREES not in window.image_pane.info.text()
    other = next(c for c in window.classes if c != p.label)
    more = [replace(p, path=p.path.with_name(f"later-{k}.jpg"), file=f"slide-1/later-{k}.jpg", label=other)
            for k in range(40)]
    window.session.add(more)
    now = window.session.prediction(row)
    assert REVIEW_DISAGREES in now.review_reason
    assert window.image_pane.prediction is now and REVIEW_DISAGREES in window.image_pane.info.text()


def test_a_folder_in_another_labs_colours_says_what_to_do(qtbot, make_window, all4: Path, tmp_path: Path) -> None:
    """The site's first run on another stain: one message with what to do, and the slide's note."""
    import numpy as np

    from bcc_desk.bundle import InputSpec
    from bcc_desk.colour import colour_features, fit_colour_profile
    from bcc_desk.images import open_image
    from bcc_desk.preprocess import make_transform
    from trainer.shifts import SHIFTS_BY_NAME

    to_input = make_transform(InputSpec(size=64))  # make_bundle's input: the pixels the check measures
    train = [(p, k) for k, c in enumerate(CLASSES) for p in sorted((all4 / c).glob("*.jpg"))[:30]]
    features = np.stack([colour_features(to_input(open_image(p)).numpy()) for p, _ in train])
    profile = fit_colour_profile(features, np.array([k for _, k in train]), len(CLASSES))
    profile = replace(profile, threshold=float(np.quantile(profile.distances(features), 0.99)))
    coloured = make_bundle(tmp_path / "coloured", colour=profile)
    root = tmp_path / "other lab"
    for slide, shift in (("stained", SHIFTS_BY_NAME["hue +40"]), ("ours", SHIFTS_BY_NAME["none"])):
        (root / slide).mkdir(parents=True)
        for c in CLASSES:
            for p in sorted((all4 / c).glob("*.jpg"))[40:42]:
                shift.apply(open_image(p)).save(root / slide / f"{p.stem}.png")
    window = make_window(spec=RunSpec((coloured,), ClassifierOptions(device="cpu", compile=False)))
    messages: list[str] = []
    window.error_shown.connect(messages.append)
    assert run(qtbot, window, root) is True
    assert any("of 16 images have colours unlike the slides this model was trained on" in m for m in messages)
    notes = {s: c.note for s, c in window.slides.summary.slides.items()}
    assert notes["stained"].startswith("8 of 8 fields: colours unlike training") and notes["ours"] == ""
    table = window.slides.summary.table
    assert table.horizontalHeaderItem(table.columnCount() - 1).text() == "Note"
    assert table.item(list(notes).index("stained"), table.columnCount() - 1).text() == notes["stained"]


# ---------------------------------------------------------------------------------------------
# Slides: verdict, identity, sign-off, the PDF report (issue #36)

PATIENT = "P-0042"


@pytest.fixture()
def lab_folder(tmp_path: Path, real_images) -> Path:
    """Two slide folders of 12 real images each (enough fields for a call) and a slides.csv
    naming slide-A's patient, as a lab keeps it beside the slide folders."""
    root = slide_folders(tmp_path / "lab case", real_images, 6, ("slide-A", "slide-B"), empty_file=False)
    (root / SLIDES_CSV).write_text(f"slide,patient_id,accession,specimen_date,note\nslide-A,{PATIENT},ACC-1,2026-11-30,\n",
                                   encoding="utf-8")
    return root


@pytest.fixture()
def lab_done(qtbot, window: MainWindow, lab_folder: Path) -> MainWindow:
    assert run(qtbot, window, lab_folder) is True
    return window


def _slide_cells(window: MainWindow) -> dict[str, dict[str, QTableWidgetItem]]:
    """The slide pane's cells: slide -> header -> item."""
    table = window.slides.summary.table
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    return {table.item(r, 0).text(): {h: table.item(r, c) for c, h in enumerate(headers)} for r in range(table.rowCount())}


def test_the_slide_pane_shows_each_slides_verdict_and_identity(lab_done: MainWindow) -> None:
    window = lab_done
    table = window.slides.summary.table
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert headers == ["Slide", "Patient id", "Verdict", "To review", "Images", *window.classes,
                       "Flagged", "Unreadable", "Reviewed", "Signed", "Note"]
    counts = window.session.slide_counts()
    cells = _slide_cells(window)
    assert list(cells) == list(counts) == ["slide-A", "slide-B"]
    for slide, count in counts.items():
        verdict = slide_verdict(count)
        cell = cells[slide]["Verdict"]
        # The same words as the report's Slides sheet; a slide to review is marked and amber.
        assert cell.text() == (TO_REVIEW_MARK if verdict.to_review else "") + verdict.call
        assert cells[slide]["To review"].text() == "; ".join(verdict.to_review)
        if verdict.to_review:
            assert cell.background().color() == FLAGGED_BACKGROUND and cell.toolTip() == verdict.review_text
        else:
            assert cell.background().style() == Qt.BrushStyle.NoBrush
        assert cells[slide]["Images"].text() == "12" and cells[slide]["Signed"].text() == ""
    # The patient id from the folder's slides.csv; slide-B has none.
    assert cells["slide-A"]["Patient id"].text() == PATIENT and cells["slide-B"]["Patient id"].text() == ""
    assert "accession: ACC-1" in cells["slide-A"]["Patient id"].toolTip()
    aid = window.slides.summary.decision_aid
    assert aid.text() == DECISION_AID and aid.isVisible()
    assert window.slides.summary.signed_label.text() == "0 of 2 slides signed"
    # Nothing selected: the slide actions are off.
    assert not any(a.isEnabled() for a in (window.slides.details_action, window.slides.sign_action, window.slides.unsign_action))


def test_a_slides_details_edited_in_the_dialog_are_written_to_slides_csv(qtbot, lab_done: MainWindow, lab_folder: Path,
                                                                        monkeypatch) -> None:
    window = lab_done
    csv_path = lab_folder / SLIDES_CSV
    before = csv_path.read_bytes()
    window.slides.summary.select_slide("slide-B")
    assert window.slides.selected_slide() == "slide-B" and window.slides.details_action.isEnabled()
    window.slides.details_action.trigger()
    dialog = window.slides.dialog
    assert dialog is not None and dialog.isVisible() and dialog.slide == "slide-B"
    dialog.patient_id.setText("  P-77 ")
    dialog.accession.setText("ACC-9")
    dialog.note.setText("bone marrow aspirate")
    # A date not as YYYY-MM-DD: the dialog says so, stays open, and nothing is written.
    dialog.specimen_date.setText("30/11/2026")
    dialog.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    assert dialog.isVisible() and "YYYY-MM-DD" in dialog.message.text() and dialog.message.isVisible()
    assert csv_path.read_bytes() == before and "slide-B" not in window.session.identities
    # A file that cannot be written (the disk full): the same.
    dialog.specimen_date.setText("2026-11-30")

    def disk_full(*_args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("bcc_desk.review.write_slides_csv", disk_full)
        dialog.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    assert dialog.isVisible() and "No space left" in dialog.message.text()
    assert csv_path.read_bytes() == before and "slide-B" not in window.session.identities
    # Now it saves: slides.csv holds both slides, and the pane shows the new patient id.
    dialog.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    qtbot.waitUntil(lambda: window.slides.dialog is None, timeout=5_000)
    written = read_slides_csv(lab_folder)
    assert written["slide-B"] == SlideIdentity("P-77", "ACC-9", "2026-11-30", "bone marrow aspirate")
    assert written["slide-A"].patient_id == PATIENT
    assert _slide_cells(window)["slide-B"]["Patient id"].text() == "P-77"
    assert window.slides.selected_slide() == "slide-B"  # the refresh kept the selection
    # A double-click on a row opens that slide's dialog, filled in.
    table = window.slides.summary.table
    rect = table.visualItemRect(table.item(0, 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())  # a real double-click's first
    qtbot.mouseDClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    dialog = window.slides.dialog
    assert dialog is not None and dialog.slide == "slide-A" and dialog.patient_id.text() == PATIENT
    dialog.reject()


def test_signing_a_slide_and_a_later_review_clearing_it(qtbot, lab_done: MainWindow) -> None:
    window = lab_done
    window.settings.reviewer = "Dr Ada Lovelace"  # Review > Reviewer name: signs as reviews are
    messages: list[str] = []
    window.error_shown.connect(messages.append)
    window.slides.summary.select_slide("slide-A")
    assert window.slides.sign_action.isEnabled() and not window.slides.unsign_action.isEnabled()
    window.slides.sign_action.trigger()
    signature = window.session.signature("slide-A")
    assert signature is not None and signature.by == "Dr Ada Lovelace"
    cells = _slide_cells(window)
    assert cells["slide-A"]["Signed"].text() == f"Dr Ada Lovelace, {signature.at.astimezone():%Y-%m-%d %H:%M}"
    assert cells["slide-B"]["Signed"].text() == ""
    assert window.slides.summary.signed_label.text() == "1 of 2 slides signed"
    assert window.slides.unsign_action.isEnabled() and not window.slides.sign_action.isEnabled()
    # "Remove signature", and signing again.
    window.slides.unsign_action.trigger()
    assert window.session.signature("slide-A") is None and _slide_cells(window)["slide-A"]["Signed"].text() == ""
    window.slides.sign("slide-A")
    assert not messages
    # A review changed in the signed slide afterwards: the signature goes, and the window says so.
    image = next(p for p in window.predictions() if p.slide == "slide-A" and p.error is None)
    window.set_review(image.path, LABELS[2])
    assert len(messages) == 1 and "slide-A" in messages[0] and "cleared" in messages[0]
    assert window.session.signature("slide-A") is None
    assert _slide_cells(window)["slide-A"]["Signed"].text() == ""
    assert window.slides.summary.signed_label.text() == "0 of 2 slides signed"
    assert window.slides.sign_action.isEnabled() and not window.slides.unsign_action.isEnabled()
    # A review in an unsigned slide clears nothing and says nothing.
    window.set_review(next(p.path for p in window.predictions() if p.slide == "slide-B"), LABELS[1])
    assert len(messages) == 1


def test_export_to_pdf_and_the_signature_in_the_workbook(qtbot, lab_done: MainWindow, tmp_path: Path,
                                                         monkeypatch) -> None:
    window = lab_done
    monkeypatch.setattr("bcc_desk.gui.window_menus.QInputDialog.getText", lambda *a, **k: ("  St Elsewhere  Haematology ", True))
    window.menus.lab_name_action.trigger()  # File > Lab name...
    assert window.settings.lab_name == "St Elsewhere Haematology"
    assert window.desk.snapshot().lab.lab_name == "St Elsewhere Haematology"
    window.slides.sign("slide-A")
    xlsx = window.export_report(tmp_path / "review.xlsx")
    ws = openpyxl.load_workbook(xlsx)["Slides"]
    header = [c.value for c in ws[1]]
    assert "signed by" in header and "verdict" in header
    rows = {r[0]: dict(zip(header, r)) for r in ws.iter_rows(min_row=2, values_only=True)}
    assert rows["slide-A"]["signed by"] == window.settings.reviewer and rows["slide-A"]["signed at"] is not None
    assert rows["slide-B"]["signed by"] is None
    assert rows["slide-A"]["patient id"] == PATIENT
    counts = window.session.slide_counts()
    assert all(rows[s]["verdict"] == slide_verdict(c).call for s, c in counts.items())
    pdf = window.export_report(tmp_path / "review.pdf")
    assert pdf == tmp_path / "review.pdf" and pdf.read_bytes().startswith(b"%PDF")
    assert b"St Elsewhere Haematology" in pdf.read_bytes()  # the lab's name (in the document's info too)
    # Through the export dialog: the PDF type chosen and a name typed without a suffix.
    chosen = tmp_path / "from the dialog"
    monkeypatch.setattr("bcc_desk.gui.export_dialog.QFileDialog.getSaveFileName",
                        lambda *a, **k: (str(chosen), "PDF report (*.pdf)"))
    window.menus.export_action.trigger()
    qtbot.waitUntil(lambda: "Report written" in window.statusBar().currentMessage(), timeout=30_000)
    assert chosen.with_name(chosen.name + ".pdf").read_bytes().startswith(b"%PDF")
    assert not window.session.unexported_reviews


# ---------------------------------------------------------------------------------------------
# A model its trainer did not find fit for use (#37): asked before it runs, said on every page

UNFIT_REASON = "validation too small to measure it (Benign: 3 images)"


@pytest.fixture(scope="module")
def unfit_bundle(tmp_path_factory) -> Path:
    from bcc_desk.bundle import Verdict, record_verdict

    folder = make_bundle(tmp_path_factory.mktemp("gui-unfit") / "unfit", seed=2)
    record_verdict(folder, Verdict(False, [UNFIT_REASON], "at least 25 validation images of every class"))
    return folder.resolve()


@pytest.fixture()
def few(tmp_path: Path, real_images) -> Path:
    """One real image of each class in one slide folder: a run of a few seconds."""
    return slide_folders(tmp_path / "few", real_images, 1, ("slide-1",), empty_file=False)


def _pick_in_dialog(monkeypatch, folder: Path) -> None:
    """Model > Model... ticks `folder` alone and is accepted (no modal loop)."""
    def accept(dialog: ModelDialog) -> int:
        if folder not in dialog.listed_folders():
            assert dialog.add_bundle(folder)  # "Add bundle folder..."
        for i, listed in enumerate(dialog.listed_folders()):
            dialog.list.item(i).setCheckState(Qt.CheckState.Checked if listed == folder else Qt.CheckState.Unchecked)
        return ModelDialog.DialogCode.Accepted

    monkeypatch.setattr("bcc_desk.gui.model_picker.ModelDialog.exec", accept)


def _answer_unvalidated(window: MainWindow, button, asked: list[str]) -> None:
    """Click `button` in the real question box once `confirm_unvalidated` shows it."""
    tries = itertools.count()

    def click() -> None:
        box = window.models.unvalidated_box
        if box is None:
            if next(tries) < 500:
                QTimer.singleShot(10, click)
            return
        asked.append(box.text())
        assert box.defaultButton() is box.button(QMessageBox.StandardButton.No)
        box.button(button).click()

    QTimer.singleShot(0, click)


def test_the_model_dialog_marks_a_model_that_is_not_validated(qtbot, bundle: Path, unfit_bundle: Path) -> None:
    from bcc_desk.gui.model_dialog import NOT_VALIDATED_MARK

    dialog = ModelDialog(RunSpec((unfit_bundle,), ClassifierOptions(allow_unvalidated=True)), known=[bundle])
    qtbot.addWidget(dialog)
    folders = dialog.listed_folders()
    unfit = dialog.list.item(folders.index(unfit_bundle))
    fit = dialog.list.item(folders.index(bundle.resolve()))
    assert unfit.text().endswith(NOT_VALIDATED_MARK) and NOT_VALIDATED_MARK not in fit.text()
    assert unfit.foreground().color() == ERROR_TEXT and UNFIT_REASON in unfit.toolTip()
    dialog.list.setCurrentItem(unfit)
    assert "NOT VALIDATED: " + UNFIT_REASON in dialog.details.toPlainText()
    # The confirmation holds while the same bundles stay ticked, and goes with another bundle.
    assert dialog.spec().options.allow_unvalidated
    fit.setCheckState(Qt.CheckState.Checked)
    assert not dialog.spec().options.allow_unvalidated
    fit.setCheckState(Qt.CheckState.Unchecked)
    assert dialog.spec().options.allow_unvalidated


def test_declining_a_model_that_is_not_validated_keeps_the_model_in_use(qtbot, window: MainWindow, unfit_bundle: Path,
                                                                         monkeypatch) -> None:
    before, remembered = window.spec, window.settings.model_dirs
    _pick_in_dialog(monkeypatch, unfit_bundle)
    asked: list[str] = []
    _answer_unvalidated(window, QMessageBox.StandardButton.No, asked)
    window.menus.model_action.trigger()  # Model > Model...
    assert asked == [f"Model test-convnext_atto-2 is not validated: {UNFIT_REASON}. Its labels cannot be trusted. "
                     "Run it anyway? Every page of its reports will say so."]
    assert window.spec == before and window.settings.model_dirs == remembered
    assert "NOT VALIDATED" not in window.status_area.model_label.text()


def test_a_confirmed_model_that_is_not_validated_runs_and_every_page_says_so(qtbot, window: MainWindow, unfit_bundle: Path,
                                                                               few: Path, tmp_path: Path, settings: QSettings,
                                                                               monkeypatch) -> None:
    _pick_in_dialog(monkeypatch, unfit_bundle)
    asked: list[str] = []
    _answer_unvalidated(window, QMessageBox.StandardButton.Yes, asked)
    window.menus.model_action.trigger()
    assert len(asked) == 1
    assert window.spec.model_dirs == (unfit_bundle,) and window.spec.options.allow_unvalidated
    assert "NOT VALIDATED" in window.status_area.model_label.text() and UNFIT_REASON in window.status_area.model_label.toolTip()
    # The model is remembered; the confirmation is not (it holds for this session).
    assert window.settings.model_dirs == [unfit_bundle]
    settings.sync()
    assert not [k for k in settings.allKeys() if "unvalid" in k.lower() or "allow" in k.lower()]
    monkeypatch.setattr(window, "confirm_unvalidated", lambda metas: pytest.fail("asked twice"))
    assert run(qtbot, window, few) is True
    assert window.model.rowCount() == len(discover_images(few))
    xlsx = window.export_report(tmp_path / "unfit.xlsx")
    assert run_sheet(xlsx)["model verdict"].startswith("NOT VALIDATED")
    assert UNFIT_REASON in run_sheet(xlsx)["model verdict"]
    assert openpyxl.load_workbook(xlsx)["Images"].oddHeader.left.text.startswith("MODEL NOT VALIDATED")


def test_a_window_started_with_a_model_that_is_not_validated_asks_before_its_first_run(
    qtbot, make_window, unfit_bundle: Path, few: Path, tmp_path: Path
) -> None:
    window = make_window(spec=None, model_dirs=[unfit_bundle])  # as `bcc-desk -m FOLDER`, or remembered
    assert not window.spec.options.allow_unvalidated and "NOT VALIDATED" in window.status_area.model_label.text()
    messages: list[str] = []
    window.error_shown.connect(messages.append)
    answers: list[bool] = [False, True]
    asked: list[list] = []
    window.models.confirm_unvalidated = lambda metas: asked.append(metas) or answers.pop(0)
    window.open_folder(few)  # declined: nothing runs
    assert [m.name for m in asked[0]] == ["test-convnext_atto-2"]
    assert not window.is_running() and window.root is None and window.model.rowCount() == 0
    assert messages and "not validated" in messages[-1] and UNFIT_REASON in messages[-1] and "Model" in messages[-1]
    assert not window.spec.options.allow_unvalidated
    assert run(qtbot, window, few) is True  # confirmed this time
    assert len(asked) == 2 and window.spec.options.allow_unvalidated
    assert window.model.rowCount() == len(discover_images(few))
    assert run_sheet(window.export_report(tmp_path / "r.xlsx"))["model verdict"].startswith("NOT VALIDATED")
