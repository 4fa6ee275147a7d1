"""The main window: open a slide folder, watch the table fill, review, export.

Automation API (used by the tests and usable from a script):

    window = MainWindow(model_dirs=[bundle], settings=QSettings(ini, QSettings.IniFormat))
    window.open_folder(folder)                  # starts classifying at once, in a thread
    window.confirm_unvalidated(metas)           # asked before a model its trainer found unfit runs
    window.classification_finished             # Signal(bool): True when every image was done
    window.set_review("slide/img.jpg", "Benign")
    window.export_report(path)                  # -> the path written (the CLI's writer)
    window.set_watching(True)                   # "Watch this folder": bcc watch's watcher, live rows
    window.slides.set_identity("slide-1", SlideIdentity(patient_id="P-1"))  # written to FOLDER/slides.csv
    window.slides.sign("slide-1")               # signed by the reviewer, now; slides.unsign removes it
    window.desk                                 # the run, the watch, the export: no widgets
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import (
    QAction,
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QInputDialog,
    QMainWindow,
    QMenu,
    QMessageBox,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from bcc_desk.bundle_meta import BundleError, BundleMeta, read_meta, verdict_text
from bcc_desk.colour import colour_advice
from bcc_desk.gui.desk import Desk
from bcc_desk.gui.filter_bar import FilterBar
from bcc_desk.gui.help_dialogs import about_box, keyboard_shortcuts, shortcuts_dialog
from bcc_desk.gui.image_pane import ImagePane
from bcc_desk.gui.jobs import submit
from bcc_desk.gui.model_dialog import ModelDialog
from bcc_desk.gui.models import ModelChoice, not_validated, unvalidated_question
from bcc_desk.gui.palette import class_name
from bcc_desk.gui.settings import AppSettings
from bcc_desk.gui.slide_dock import SlideDock
from bcc_desk.gui.status_area import StatusArea
from bcc_desk.gui.table_model import PredictionFilter, PredictionTableModel
from bcc_desk.gui.table_view import PredictionTable
from bcc_desk.gui.thumbnails import ThumbnailCache
from bcc_desk.prediction import Prediction
from bcc_desk.review import Export, Review, ReviewSession
from bcc_desk.slides import all_slides

if TYPE_CHECKING:
    pass



class MainWindow(QMainWindow):
    """bcc-desk's window.  See the module docstring for the automation API."""

    classification_finished = Signal(bool)
    """A run ended: True when every image was classified, False when cancelled or failed."""
    rows_added = Signal(int)
    """A batch of rows arrived (its size)."""
    error_shown = Signal(str)
    """A message the user was shown (bad folder, bad model, failed export...)."""
    watch_stopped = Signal()
    """A watch of the folder ended (turned off, another folder opened, or it failed)."""

    def __init__(
        self,
        model_dirs: Sequence[Path | str] | None = None,
        settings: QSettings | None = None,
        *,
        choice: ModelChoice | None = None,
        ask_before_close: bool = True,
        parent: QWidget | None = None,
    ) -> None:
        """`model_dirs` (or a full `choice`) overrides the remembered model for this window;
        `settings` replaces the per-user QSettings (tests pass one on a temporary file)."""
        super().__init__(parent)
        self.settings = AppSettings(settings)
        self.ask_before_close = ask_before_close
        if choice is None:
            dirs = [Path(d) for d in model_dirs] if model_dirs else self.settings.model_dirs
            choice = ModelChoice(
                model_dirs=tuple(dirs),
                device=self.settings.device,
                tta=self.settings.tta,
                review_threshold=self.settings.review_threshold,
                slide_consensus=self.settings.slide_consensus,
            )
        self.desk = Desk(self.settings, choice, self._confirm_choice, self)
        """The run, the watch, the export and the session they fill; the window shows them."""
        self.session.slide_changed.connect(self._slide_changed)
        self.session.signature_cleared.connect(self._signature_cleared)
        self._slides_seen: set[str] = set()

        self.setWindowTitle("bcc-desk")
        self.setAcceptDrops(True)
        self.thumbnails = ThumbnailCache(parent=self)
        self.model = PredictionTableModel(self.session, self.thumbnails, self)
        self.proxy = PredictionFilter(self)
        self.proxy.setSourceModel(self.model)
        self._summary_timer = QTimer(self)
        self._summary_timer.setSingleShot(True)
        self._summary_timer.setInterval(300)  # live, but not once per batch of a fast GPU
        self._summary_timer.timeout.connect(self._refresh_summary)

        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self._build_central()
        self._build_dock()
        self._build_status()
        self._connect_desk()
        self._apply_choice(self.choice)
        self._restore_layout()
        self._set_running(False)

    @property
    def session(self) -> ReviewSession:
        """The rows, reviews and run record the window shows (and the export writes)."""
        return self.desk.session

    @property
    def choice(self) -> ModelChoice:
        """The model, device and options of the next run and of the watch."""
        return self.desk.choice

    @property
    def root(self) -> Path | None:
        """The folder open now (None before the first)."""
        return self.session.root

    @property
    def classes(self) -> list[str]:
        """The model's class names, as the filters, review keys and report show them."""
        return self.session.classes

    @classes.setter
    def classes(self, classes: list[str]) -> None:
        self.session.classes = list(classes)

    # =========================================================================================
    # Construction
    def _action(self, text: str, slot, shortcut: str | QKeySequence | QKeySequence.StandardKey | None = None,
                tip: str = "") -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip)
        action.triggered.connect(slot)
        return action

    def _build_actions(self) -> None:
        self.open_action = self._action("&Open folder\u2026", self._choose_folder, QKeySequence.StandardKey.Open,
                                        "Classify every image in a slide folder")
        self.rerun_action = self._action("&Classify again", self.rerun, "F5", "Run the folder again (e.g. after changing the model)")
        self.cancel_action = self._action("Cancel", self.cancel, "Esc", "Stop classifying; the images done stay")
        self.export_action = self._action("&Export report\u2026", self._choose_export, "Ctrl+E",
                                          "Write the Excel report with the review columns")
        self.model_action = self._action("&Model\u2026", self.choose_model, "Ctrl+M",
                                         "Pick the model (or an ensemble), device, TTA and review threshold")
        self.flagged_first_action = self._action("&Flagged first", self.flagged_first, "Ctrl+R",
                                                 "Sort flagged images first, least confident on top")
        self.clear_filters_action = self._action("Clear filters", self.clear_filters, "Ctrl+Shift+F")
        self.find_action = self._action("Search file names", lambda: self.filters.search.setFocus(), QKeySequence.StandardKey.Find)
        self.watch_action = self._action("&Watch this folder", self.set_watching, None,
                                         "Classify images as they arrive in the open folder, as bcc watch does")
        self.watch_action.setCheckable(True)
        self.reviewer_action = self._action("Reviewer &name\u2026", self._ask_reviewer)
        self.lab_name_action = self._action("&Lab name\u2026", self._ask_lab_name, None,
                                            "The lab's name, printed at the head of the PDF report")
        self.quit_action = self._action("&Quit", self.close, QKeySequence.StandardKey.Quit)
        self.clear_review_action = self._action("Clear the reviewed label", lambda: self.review_selected(None), "0")
        self.review_actions: list[QAction] = []
        self.shortcuts_action = self._action("&Keyboard shortcuts", self.show_shortcuts, QKeySequence.StandardKey.HelpContents,
                                             "Every key the window answers to")
        self.about_action = self._action("&About bcc-desk", self._about)
        self.shortcuts_dialog: QDialog | None = None
        self.about_box: QMessageBox | None = None
        self.unvalidated_box: QMessageBox | None = None
        """The question `confirm_unvalidated` asks, while it is asked."""

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addAction(self.open_action)
        self.recent_menu = QMenu("Open &recent", self)
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addMenu(self.recent_menu)
        file_menu.addAction(self.rerun_action)
        file_menu.addAction(self.watch_action)
        file_menu.addAction(self.cancel_action)
        file_menu.addSeparator()
        file_menu.addAction(self.export_action)
        file_menu.addAction(self.lab_name_action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)
        self.view_menu = bar.addMenu("&View")
        self.view_menu.addAction(self.flagged_first_action)
        self.view_menu.addAction(self.clear_filters_action)
        self.view_menu.addAction(self.find_action)
        self.review_menu = bar.addMenu("&Review")
        model_menu = bar.addMenu("&Model")
        model_menu.addAction(self.model_action)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self.shortcuts_action)
        help_menu.addAction(self.about_action)

    def _build_toolbar(self) -> None:
        tools = self.addToolBar("Main")
        tools.setObjectName("main-toolbar")
        tools.addAction(self.open_action)
        recent = QPushButton("Recent \u25be")
        recent.setFlat(True)
        recent.setMenu(self.recent_menu)
        tools.addWidget(recent)
        tools.addAction(self.rerun_action)
        tools.addAction(self.watch_action)
        tools.addSeparator()
        tools.addAction(self.model_action)
        tools.addAction(self.flagged_first_action)
        tools.addSeparator()
        tools.addAction(self.export_action)

    def _build_central(self) -> None:
        self.filters = FilterBar(self.proxy)
        self.filters.changed.connect(self._update_counts)

        self.table = PredictionTable(self.model, self.proxy, self.thumbnails.size)
        self.table.selectionModel().currentRowChanged.connect(lambda current, _: self._show_current())
        self.model.dataChanged.connect(self._source_changed)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(4, 4, 0, 4)
        left_layout.addWidget(self.filters)
        left_layout.addWidget(self.table, 1)

        self.image_pane = ImagePane()
        self.image_pane.review_requested.connect(self.review_selected)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.image_pane)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        self.setCentralWidget(self.splitter)

    def _build_dock(self) -> None:
        self.slides = SlideDock(self.session, self.settings, self)
        self.slides.notice.connect(self._notify)
        self.slides.status.connect(lambda message: self.statusBar().showMessage(message, 15000))
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.slides)
        self.view_menu.addAction(self.slides.toggleViewAction())

    def _build_status(self) -> None:
        self.status_area = StatusArea(self.statusBar(), self.cancel)

    def _restore_layout(self) -> None:
        geometry, state, splitter = self.settings.window_state()
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1400, 880)
        if state is not None:
            self.restoreState(state)
        if splitter is not None:
            self.splitter.restoreState(splitter)

    # =========================================================================================
    # Model choice
    def _apply_choice(self, choice: ModelChoice) -> None:
        """Show what `choice` means before anything is loaded (bundle.json only: instant)."""
        self.desk.choice = choice
        try:
            metas = [read_meta(d) for d in choice.model_dirs]
        except BundleError as exc:
            self.classes = []
            self._notify(f"model: {exc}")
            metas = []
        unvalidated = not_validated(metas)
        if metas:
            self.classes = list(metas[0].labels)  # the names the classifier will report
        self.status_area.show_model(metas, unvalidated, choice.tta)
        # The setting until a run says what it became (e.g. 'cpu (int8+fp32)'): finding out here
        # would load torch into this process, which never runs a network to classify.
        self.status_area.show_device(choice.device)
        self.filters.set_classes(self.classes)
        self._build_review_actions()
        self.image_pane.set_classes(self.classes)
        first = choice.model_dirs[0] if choice.model_dirs else None
        self.image_pane.set_cam_source((lambda: self.desk.store.cam_model(first)) if first and metas else None)
        # torch's import and the weights load now, while the user picks a folder (not for a model
        # that cannot run until the user confirms it)
        if metas and (choice.allow_unvalidated or not unvalidated):
            self.desk.engine.prepare(choice.model_dirs, choice.options())

    def choose_model(self) -> None:
        dialog = ModelDialog(self.choice, self.settings.known_models, self)
        if dialog.exec() != ModelDialog.DialogCode.Accepted:
            return
        choice = dialog.choice()
        if unconfirmed := choice.unconfirmed():
            if not self.confirm_unvalidated(unconfirmed):
                return  # the model in use stays
            choice = replace(choice, allow_unvalidated=True)
        self.set_choice(choice, remember=True)
        self.settings.known_models = dialog.listed_folders()
        if self.root is not None and self.model.rowCount():
            answer = QMessageBox.question(self, "bcc-desk", "Classify the open folder again with this model?")
            if answer == QMessageBox.StandardButton.Yes:
                self.rerun()

    def set_choice(self, choice: ModelChoice, remember: bool = False) -> None:
        """Use another model/ensemble/device/TTA/threshold from the next run on.  A bundle its
        trainer did not find fit for use runs only with `choice.allow_unvalidated`, or once the
        user confirms it (`confirm_unvalidated`, asked by the next run); that confirmation is never
        remembered."""
        self._apply_choice(choice)
        if remember:  # all but `allow_unvalidated`: a confirmation holds for this session only
            self.settings.model_dirs = list(choice.model_dirs)
            self.settings.device = choice.device
            self.settings.tta = choice.tta
            self.settings.review_threshold = choice.review_threshold
            self.settings.slide_consensus = choice.slide_consensus
        self.desk.restart_watch()  # a watch goes on with the new model

    def confirm_unvalidated(self, metas: list[BundleMeta]) -> bool:
        """Ask whether to run the bundles `metas` although they are not validated (Yes/No, No by
        default); True for Yes.  While asked, the box is `unvalidated_box`."""
        box = QMessageBox(QMessageBox.Icon.Warning, "bcc-desk \u2014 model not validated", unvalidated_question(metas),
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, self)
        box.setDefaultButton(QMessageBox.StandardButton.No)
        box.setEscapeButton(QMessageBox.StandardButton.No)
        self.unvalidated_box = box
        try:
            return box.exec() == QMessageBox.StandardButton.Yes
        finally:
            self.unvalidated_box = None
            box.deleteLater()

    def _confirm_choice(self) -> bool:
        """Whether the model in use may run: validated, confirmed already, or confirmed now (for
        this session).  Declined: a message says why nothing runs and how to run it anyway."""
        unconfirmed = self.choice.unconfirmed()
        if not unconfirmed:
            return True
        if self.confirm_unvalidated(unconfirmed):
            self._apply_choice(replace(self.choice, allow_unvalidated=True))
            return True
        said = "; ".join(f"{m.name}: {verdict_text(m)}" for m in unconfirmed)
        self._notify(f"Not classified: the model is not validated ({said}). To run it anyway, confirm it in "
                     "Model \u203a Model\u2026, or choose another model there.")
        return False

    # =========================================================================================
    # Running
    def open_folder(self, path: Path | str) -> None:
        """Classify every image under `path` (a slide folder, or a folder of slide folders).

        Returns at once; rows arrive as they are classified and `classification_finished`
        fires at the end.  A run already going is cancelled first.  A model its trainer did not
        find fit for use, not yet confirmed, is asked about first (`confirm_unvalidated`); declined,
        nothing runs and the run going on, if any, goes on."""
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        self.desk.open_folder(root.resolve())

    def rerun(self) -> None:
        if self.root is not None:
            self.open_folder(self.root)

    def cancel(self) -> None:
        """Stop the run; the images classified so far stay in the table."""
        if self.desk.cancel():
            self.statusBar().showMessage("Cancelling\u2026")

    def is_running(self) -> bool:
        return self.desk.is_running()

    def _connect_desk(self) -> None:
        desk = self.desk
        desk.run_starting.connect(self._run_starting)
        desk.prepared.connect(self._prepared)
        desk.classes_changed.connect(self._classes_changed)
        desk.rows_arrived.connect(self._rows_arrived)
        desk.device_changed.connect(self.status_area.show_device)
        desk.notice.connect(self._notify)
        desk.running_changed.connect(self._set_running)
        desk.run_finished.connect(self._run_finished)
        desk.watch_changed.connect(self._update_watch_action)
        desk.watch_starting.connect(self._watch_starting)
        desk.watch_started.connect(self._watch_started)
        desk.watch_stop_asked.connect(self._watch_stopping)
        desk.watch_ended.connect(self._watch_ended)

    def _run_starting(self, root: Path) -> None:
        self.image_pane.show_prediction(None, None)
        self._update_review_enabled()
        self.filters.clear_slides()
        self._slides_seen = set()
        self.setWindowTitle(f"bcc-desk \u2014 {root}")
        self.status_area.show_progress(0, 0)  # busy until the images are counted
        self.statusBar().showMessage(f"Loading the model and looking for images in {root}\u2026")

    def _prepared(self, total: int, device: str, preparing: str) -> None:
        self.status_area.show_progress(0, total)
        self.status_area.show_device(device)
        note = f"; {preparing} first" if preparing else ""
        self.statusBar().showMessage(f"Classifying {total} images on {device}{note}\u2026")

    def _classes_changed(self) -> None:
        self.filters.set_classes(self.classes)
        self._build_review_actions()
        self.image_pane.set_classes(self.classes)

    def _rows_arrived(self, predictions: list[Prediction], replaced: list[Prediction], first: bool) -> None:
        """New rows, or new predictions for images already in the table (one row per image)."""
        if replaced:
            self._refresh_replaced(replaced)
        new_slides = {p.slide for p in predictions} - self._slides_seen
        if new_slides:
            self._slides_seen |= new_slides
            for slide in sorted(new_slides):
                self.filters.add_slide(slide)
        if first and self.proxy.rowCount():
            self.table.selectRow(0)
            self.table.setFocus()
        if not self._summary_timer.isActive():
            self._summary_timer.start()
        self._update_counts()
        if self.is_running():
            self.status_area.show_progress(self.model.rowCount())
        else:
            self.export_action.setEnabled(self.model.rowCount() > 0)
        self.rows_added.emit(len(predictions))

    def _refresh_replaced(self, replaced: list[Prediction]) -> None:
        shown = self.image_pane.prediction
        for old in replaced:
            row = self.model.row_of(old.path)
            new = self.model.prediction(row) if row is not None else old
            if (new.label, new.probabilities, new.error) != (old.label, old.probabilities, old.error):
                # New content (a file written again): its preview and maps are of the old one.
                self.thumbnails.forget(old.path)
                self.image_pane.forget(old.path)
        if shown is not None and any(old.path == shown.path for old in replaced):
            self._show_current()

    def _run_finished(self, completed: bool, total: int, seconds: float) -> None:
        self._refresh_summary()
        done = self.model.rowCount()
        if completed:
            self.statusBar().showMessage(f"Classified {done} images in {seconds:.0f} s.", 15000)
        elif done:
            self.statusBar().showMessage(f"Stopped after {done} of {total} images.", 15000)
        if advice := colour_advice(self.session.predictions()):  # another lab's stain or camera: say what to do
            self._notify(advice)
        self.classification_finished.emit(completed)

    def _set_running(self, running: bool) -> None:
        self.status_area.show_running(running)
        self.cancel_action.setEnabled(running)
        self.rerun_action.setEnabled(not running and self.root is not None)
        has_rows = self.model.rowCount() > 0
        self.export_action.setEnabled(has_rows and not running)
        self._update_watch_action()

    # =========================================================================================
    # Watching the folder: bcc watch's watcher and ledger, its new rows shown as they come
    def set_watching(self, on: bool) -> None:
        """Watch the open folder (the "Watch this folder" toggle): images that land in it later
        are classified, once complete, by `bcc watch`'s watcher with the chosen model, recorded
        in its per-user ledger and report (FOLDER/bcc-report.xlsx), and shown as they come.
        Asked during a run, the watch starts when the run has completed."""
        self.desk.set_watching(on)

    def is_watching(self) -> bool:
        return self.desk.is_watching()

    def _watch_starting(self, root: Path, report: Path, ledger: Path) -> None:
        self.status_area.show_watch("Watching: starting\u2026", self.status_area.watch_tooltip(root, report, ledger))
        self.statusBar().showMessage(f"Loading the model to watch {root}\u2026")

    def _watch_started(self, root: Path, device: str, report: Path) -> None:
        self.status_area.show_watch("\u25c9 Watching")
        self.statusBar().showMessage(
            f"Watching {root} on {device}: new images are classified as they arrive; report {report}", 15000)

    def _watch_stopping(self) -> None:
        self.status_area.show_watch("Watching: stopping\u2026")
        self.statusBar().showMessage("Stopping the watch (the images in hand, then the report)\u2026")

    def _watch_ended(self, root: Path, current: bool) -> None:
        if current:
            self.status_area.show_watch(None)
            if not self.statusBar().currentMessage().startswith("The watch stopped"):
                self.statusBar().showMessage(f"Stopped watching {root}.", 15000)
        self.watch_stopped.emit()

    def _update_watch_action(self) -> None:
        folder = self.root is not None and self.root.is_dir()
        self.watch_action.setEnabled(self.is_watching()
                                     or (folder and not self.is_running() and not self.desk.watch_stopping()))
        self.watch_action.setChecked(self.is_watching())

    # =========================================================================================
    # Table, filters, review
    def _build_review_actions(self) -> None:
        for action in self.review_actions:
            self.removeAction(action)
            action.deleteLater()
        self.review_menu.clear()
        self.review_actions = []
        for i, c in enumerate(self.classes[:9]):
            action = self._action(f"Reviewed as {class_name(c)}", lambda _=False, label=c: self.review_selected(label),
                                  str(i + 1))
            self.review_actions.append(action)
            self.addAction(action)  # the shortcut works wherever the focus is in the window
            self.review_menu.addAction(action)
        self.review_menu.addAction(self.clear_review_action)
        self.addAction(self.clear_review_action)
        self.review_menu.addSeparator()
        for action in self.slides.actions_on_slide():
            self.review_menu.addAction(action)
        self.review_menu.addSeparator()
        self.review_menu.addAction(self.reviewer_action)
        self._update_review_enabled()

    def _update_review_enabled(self) -> None:
        """The class actions only for an image a person can see: an unreadable one cannot be
        labelled (clearing stays possible)."""
        shown = self.image_pane.prediction
        enabled = shown is not None and shown.error is None
        for action in self.review_actions:
            action.setEnabled(enabled)

    def clear_filters(self) -> None:
        self.filters.set_filters()

    def flagged_first(self) -> None:
        """One click to the images that need a person: flagged first, least confident on top."""
        self.table.flagged_first()

    def visible_predictions(self) -> list[Prediction]:
        """The rows as the table shows them now (filters and sort applied)."""
        return self.table.shown()

    def predictions(self) -> list[Prediction]:
        return self.session.predictions()

    def reviews(self) -> dict[Path, Review]:
        return self.session.reviews()

    def review_selected(self, label: str | None) -> None:
        """Give the selected image(s) a reviewed label (None clears it); with one image
        selected, move on to the next row so a reviewer can go key, key, key."""
        rows = self.table.selected_source_rows()
        if label is not None:  # unreadable images in a wider selection keep no label
            rows = [r for r in rows if self.model.prediction(r).error is None]
        if not rows:
            return
        for row in rows:
            self._set_review_row(row, label)
        if len(rows) == 1:
            self.table.select_next()

    def set_review(self, target: int | str | Path, label: str | None) -> None:
        """Set the reviewed label of one image: `target` is a row of the (unsorted) model, the
        file as the table shows it (relative to the folder), or the image's path."""
        self._set_review_row(self.session.find(target), label)

    def _set_review_row(self, row: int, label: str | None) -> None:
        self.session.set_review(row, label, self.settings.reviewer)
        if not self._summary_timer.isActive():
            self._summary_timer.start()

    def _source_changed(self, top_left, bottom_right, roles=()) -> None:
        pane_prediction = self.image_pane.prediction
        if pane_prediction is None:
            return
        row = self.model.row_of(pane_prediction.path)
        if row is not None and top_left.row() <= row <= bottom_right.row():
            now = self.model.prediction(row)
            if now is not pane_prediction:  # its flags settled again as its slide grew
                self.image_pane.show_prediction(now, self.model.review(row))
            else:
                self.image_pane.update_review(self.model.review(row))

    def _show_current(self) -> None:
        row = self.table.current_source_row()
        if row is None:
            self.image_pane.show_prediction(None, None)
        else:
            self.image_pane.show_prediction(self.model.prediction(row), self.model.review(row))
        self._update_review_enabled()

    def _refresh_summary(self) -> None:
        self.slides.refresh(self.classes)
        self._update_counts()

    def _update_counts(self) -> None:
        counts = all_slides(self.slides.summary.slides)
        total = self.model.rowCount()
        self.status_area.show_counts(total, counts)
        self.filters.show_count(self.proxy.rowCount(), total)

    def _ask_reviewer(self) -> None:
        name, ok = QInputDialog.getText(self, "Reviewer", "Name recorded with each review and sign-off:",
                                        text=self.settings.reviewer)
        if ok and name.strip():
            self.settings.reviewer = name

    # =========================================================================================
    # Slides: identity and sign-off (kept by the session; the Slides dock shows and edits them)
    def _slide_changed(self, _slide: str) -> None:
        self._refresh_summary()  # one person's edit, not a stream of rows: at once

    def _signature_cleared(self, _slide: str, message: str) -> None:
        self._notify(message)  # the pane is refreshed already: `slide_changed` came first

    def _ask_lab_name(self) -> None:
        name, ok = QInputDialog.getText(self, "Lab name", "The lab's name, printed at the head of the PDF report:",
                                        text=self.settings.lab_name)
        if ok:
            self.settings.lab_name = name

    # =========================================================================================
    # Export
    def default_report_path(self) -> Path | None:
        return self.desk.default_report_path()

    def snapshot(self) -> Export:
        """What an export writes now (`Desk.snapshot`).  Raises ValueError when there is nothing."""
        return self.desk.snapshot()

    def export_report(self, path: Path | str | None = None) -> Path:
        """Write the report by the path's suffix (.xlsx, .csv: the Images rows, .pdf: a page per
        slide) with the review columns and the slides' identities, verdicts and sign-offs; return
        the path written (beside the asked one when that is open in Excel).  Raises ReportError,
        or ValueError for another suffix."""
        return self.desk.export_report(path)

    def _choose_export(self) -> None:
        try:
            snapshot = self.snapshot()
        except ValueError as exc:
            self._notify(str(exc))
            return
        default = self.default_report_path()
        filters = {"Excel workbook (*.xlsx)": ".xlsx", "CSV, images only (*.csv)": ".csv", "PDF report (*.pdf)": ".pdf"}
        path, chosen = QFileDialog.getSaveFileName(self, "Export report", str(default or ""), ";;".join(filters))
        if not path:
            return
        out = Path(path)
        if out.suffix.lower() not in filters.values():  # no suffix, or another: the chosen type's
            out = out.with_name(out.name + filters.get(chosen, ".xlsx"))
        try:
            self.desk.check_export_target(out)
        except ValueError as exc:
            self._notify(str(exc))
            return
        self.statusBar().showMessage(f"Writing {out}\u2026")
        submit(self.desk.export_pool, lambda: snapshot.write(out), lambda result: self._exported(snapshot, out, *result),
               lambda reason: self._notify(f"{reason}; the reviews are kept: export again elsewhere"))

    def _exported(self, snapshot: Export, asked: Path, written: Path, diverted: str | None) -> None:
        self.session.exported(snapshot)
        if diverted:  # no space, read-only, the folder gone: a fallback folder took it
            self._notify(f"{diverted}; the report was written to {written} instead")
        elif written != asked:  # the writer never overwrites a workbook someone has open
            self._notify(f"{asked.name} is open in another program; the report was written to {written}")
        else:
            self.statusBar().showMessage(f"Report written: {written}", 15000)

    # =========================================================================================
    # Opening folders: dialog, recent, drag and drop
    def _choose_folder(self) -> None:
        start = self.settings.last_folder or str(Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Open a slide folder", start)
        if folder:
            self._open_from_ui(folder)

    def _open_from_ui(self, folder: str | Path) -> None:
        try:
            self.open_folder(folder)
        except OSError as exc:
            self._notify(str(exc))

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.recent_folders
        for folder in recent:
            action = self.recent_menu.addAction(folder)
            action.triggered.connect(lambda _=False, f=folder: self._open_from_ui(f))
        if recent:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear the list", self.settings.clear_recent_folders)
        else:
            self.recent_menu.addAction("(none yet)").setEnabled(False)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if _dropped_folder(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        folder = _dropped_folder(event)
        if folder is None:
            event.ignore()
            return
        event.acceptProposedAction()
        self._open_from_ui(folder)

    # =========================================================================================
    # Messages, closing
    def _notify(self, message: str) -> None:
        """Tell the user without blocking: status bar, plus a non-modal box when on screen."""
        self.statusBar().showMessage(message, 20000)
        self.error_shown.emit(message)
        if self.isVisible():
            box = QMessageBox(QMessageBox.Icon.Warning, "bcc-desk", message, QMessageBox.StandardButton.Ok, self)
            box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
            box.open()

    def keyboard_shortcuts(self) -> list[tuple[str, str]]:
        """(keys, what they do) for every shortcut the window has now (`help_dialogs`)."""
        return keyboard_shortcuts(self)

    def show_shortcuts(self) -> None:
        """Help > Keyboard shortcuts: a small non-modal table of `keyboard_shortcuts()`."""
        if self.shortcuts_dialog is not None:
            self.shortcuts_dialog.close()
        dialog = shortcuts_dialog(self, self.keyboard_shortcuts())
        dialog.destroyed.connect(lambda _=None: setattr(self, "shortcuts_dialog", None))
        self.shortcuts_dialog = dialog
        dialog.show()

    def _about(self) -> None:
        box = about_box(self)
        box.destroyed.connect(lambda _=None: setattr(self, "about_box", None))
        self.about_box = box
        box.open()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.ask_before_close and self.session.unexported_reviews:
            answer = QMessageBox.question(
                self, "bcc-desk", "Some reviews have not been exported. Export the report before closing?",
                QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
            )
            if answer == QMessageBox.StandardButton.Cancel:
                event.ignore()
                return
            if answer == QMessageBox.StandardButton.Save:
                self._choose_export()
                self.desk.export_pool.waitForDone()
        self.shutdown()
        self.settings.save_window_state(self.saveGeometry(), self.saveState(), self.splitter.saveState())
        self.settings.sync()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the run, the watch and the helper threads (closing the window does this; the
        folder watched now is watched again when next opened)."""
        self.desk.shutdown()
        self.status_area.show_watch(None)
        self.thumbnails.wait()
        self.image_pane.shutdown()


def _dropped_folder(event: QDragEnterEvent | QDropEvent) -> Path | None:
    mime = event.mimeData()
    if mime is None or not mime.hasUrls():
        return None
    for url in mime.urls():
        if url.isLocalFile():
            path = Path(url.toLocalFile())
            if path.is_dir() or path.is_file():
                return path
    return None
