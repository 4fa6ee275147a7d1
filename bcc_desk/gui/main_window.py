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
    window.menus, window.models                 # actions and menus; the model choice (`model_picker`)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import QMimeData, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QFileDialog, QMainWindow, QMessageBox, QSplitter, QVBoxLayout, QWidget

from bcc_desk.bundle_meta import BundleMeta
from bcc_desk.classify_process import ClassifierProcess
from bcc_desk.colour import colour_advice
from bcc_desk.gui.desk import Desk
from bcc_desk.gui.export_dialog import choose_export
from bcc_desk.gui.filter_bar import FilterBar
from bcc_desk.gui.image_pane import ImagePane
from bcc_desk.gui.model_picker import ModelPicker
from bcc_desk.gui.settings import AppSettings
from bcc_desk.gui.slide_dock import SlideDock
from bcc_desk.gui.status_area import StatusArea
from bcc_desk.gui.table_model import PredictionFilter, PredictionTableModel
from bcc_desk.gui.table_view import PredictionTable
from bcc_desk.gui.thumbnails import ThumbnailCache
from bcc_desk.gui.window_menus import WindowMenus
from bcc_desk.options import RunSpec
from bcc_desk.prediction import Prediction
from bcc_desk.review import Review, ReviewSession
from bcc_desk.slides import all_slides


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
        spec: RunSpec | None = None,
        ask_before_close: bool = True,
        engine: ClassifierProcess | None = None,
        parent: QWidget | None = None,
    ) -> None:
        """`model_dirs` (or a whole `spec`) overrides the remembered model for this window;
        `settings` replaces the per-user QSettings (tests pass one on a temporary file);
        `engine` is a classifier process to share (see `Desk`)."""
        super().__init__(parent)
        self.settings = AppSettings(settings)
        self.ask_before_close = ask_before_close
        if spec is None:
            spec = self.settings.run_spec([Path(d) for d in model_dirs] if model_dirs else None)
        self.desk = Desk(self.settings, spec, lambda: self.models.confirm_choice(), self, engine)
        """The run, the watch, the export and the session they fill; the window shows them."""
        self.models = ModelPicker(self, self.desk, self.settings, self.notify)
        """The model choice: what it shows, the dialog, the question before an unvalidated model."""
        self.session.slide_changed.connect(lambda _slide: self._refresh_summary())  # one person's edit: at once
        # the pane is refreshed already (`slide_changed` came first); say why the signature went
        self.session.signature_cleared.connect(lambda _slide, message: self.notify(message))

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

        self.menus = m = WindowMenus(self, self.settings, self.review_selected, self.open_from_ui)
        """Actions, menus, toolbar and the review keys."""
        for action, slot in ((m.open_action, self.choose_folder), (m.rerun_action, self.rerun), (m.cancel_action, self.cancel),
                             (m.export_action, self.choose_export), (m.model_action, self.models.choose),
                             (m.flagged_first_action, self.flagged_first), (m.clear_filters_action, self.clear_filters),
                             (m.find_action, lambda: self.filters.search.setFocus()), (m.watch_action, self.set_watching)):
            action.triggered.connect(slot)
        self._build_central()
        self._build_dock()
        self.status_area = StatusArea(self.statusBar(), self.cancel)
        self._connect_desk()
        self.models.applied.connect(self._show_model)
        self.models.apply(self.spec)
        self.settings.restore_window(self, self.splitter)
        self._set_running(False)

    @property
    def session(self) -> ReviewSession:
        """The rows, reviews and run record the window shows (and the export writes)."""
        return self.desk.session

    @property
    def spec(self) -> RunSpec:
        """The model, device and options of the next run and of the watch."""
        return self.desk.spec

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
    def _build_central(self) -> None:
        self.filters = FilterBar(self.proxy)
        self.filters.changed.connect(self._update_counts)

        self.table = PredictionTable(self.model, self.proxy, self.thumbnails.size)
        self.table.selectionModel().currentRowChanged.connect(lambda current, _: self._show_current())

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(4, 4, 0, 4)
        left_layout.addWidget(self.filters)
        left_layout.addWidget(self.table, 1)

        self.image_pane = ImagePane()
        self.model.dataChanged.connect(lambda top, bottom, *_: self.image_pane.rows_changed(self.model, top.row(), bottom.row()))
        self.image_pane.review_requested.connect(self.review_selected)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.image_pane)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        self.setCentralWidget(self.splitter)

    def _build_dock(self) -> None:
        self.slides = SlideDock(self.session, self.settings, self)
        self.slides.notice.connect(self.notify)
        self.slides.status.connect(lambda message: self.statusBar().showMessage(message, 15000))
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.slides)
        self.menus.view_menu.addAction(self.slides.toggleViewAction())

    # =========================================================================================
    # Model choice (`ModelPicker`)
    def _show_model(self, metas: list[BundleMeta], unvalidated: list[BundleMeta]) -> None:
        self.status_area.show_model(metas, unvalidated, self.spec.options.tta)
        # The setting until a run says what it became (e.g. 'cpu (int8+fp32)'): finding out here
        # would load torch into this process, which never runs a network to classify.
        self.status_area.show_device(self.spec.options.device)
        self.show_classes()
        first = self.spec.model_dirs[0] if metas else None
        self.image_pane.set_cam_source((lambda: self.desk.store.cam_model(first)) if first else None)

    def set_spec(self, spec: RunSpec, remember: bool = False) -> None:
        """Use another model/ensemble/device/TTA/threshold from the next run on.  A bundle its
        trainer did not find fit for use runs only with `spec.options.allow_unvalidated`, or once
        the user confirms it (`confirm_unvalidated`, asked by the next run); that confirmation is
        never remembered."""
        self.models.set_spec(spec, remember)

    def confirm_unvalidated(self, metas: list[BundleMeta]) -> bool:
        """Ask whether to run `metas` although not validated; while asked: `models.unvalidated_box`."""
        return self.models.confirm_unvalidated(metas)

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
        desk.prepared.connect(self.status_area.prepared)
        desk.classes_changed.connect(self.show_classes)
        desk.rows_arrived.connect(self._rows_arrived)
        desk.device_changed.connect(self.status_area.show_device)
        desk.notice.connect(self.notify)
        desk.running_changed.connect(self._set_running)
        desk.run_finished.connect(self._run_finished)
        desk.watch_changed.connect(self._update_watch_action)
        desk.watch_starting.connect(self.status_area.watch_starting)
        desk.watch_started.connect(self.status_area.watch_started)
        desk.watch_stop_asked.connect(self.status_area.watch_stopping)
        desk.watch_ended.connect(self.status_area.watch_ended)
        desk.watch_ended.connect(lambda *_: self.watch_stopped.emit())

    def _run_starting(self, root: Path) -> None:
        self.image_pane.show_prediction(None, None)
        self._update_review_enabled()
        self.filters.clear_slides()
        self.setWindowTitle(f"bcc-desk \u2014 {root}")
        self.status_area.run_starting(root)

    def _rows_arrived(self, predictions: list[Prediction], replaced: list[Prediction], first: bool) -> None:
        """New rows, or new predictions for images already in the table (one row per image)."""
        if replaced:
            self._refresh_replaced(replaced)
        self.filters.add_slides({p.slide for p in predictions})
        if first and self.proxy.rowCount():
            self.table.selectRow(0)
            self.table.setFocus()
        if not self._summary_timer.isActive():
            self._summary_timer.start()
        self._update_counts()
        if self.is_running():
            self.status_area.show_progress(self.model.rowCount())
        else:
            self.menus.export_action.setEnabled(self.model.rowCount() > 0)
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
        self.status_area.run_finished(completed, self.model.rowCount(), total, seconds)
        if advice := colour_advice(self.session.predictions()):  # another lab's stain or camera: say what to do
            self.notify(advice)
        self.classification_finished.emit(completed)

    def _set_running(self, running: bool) -> None:
        self.status_area.show_running(running)
        self.menus.show_running(running, self.model.rowCount() > 0, self.root is not None)
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

    def _update_watch_action(self) -> None:
        folder = self.root is not None and self.root.is_dir()
        self.menus.show_watch(self.is_watching(), folder and not self.is_running() and not self.desk.watch_stopping())

    # =========================================================================================
    # Table, filters, review
    def show_classes(self) -> None:
        """The model's classes, where the filters, review keys and image pane offer them."""
        self.filters.set_classes(self.classes)
        self.menus.set_classes(self.classes, self.slides.actions_on_slide())
        self.image_pane.set_classes(self.classes)
        self._update_review_enabled()

    def _update_review_enabled(self) -> None:
        """The class keys only for an image a person can see: an unreadable one cannot be labelled."""
        shown = self.image_pane.prediction
        self.menus.enable_review(shown is not None and shown.error is None)

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

    # =========================================================================================
    # Export
    def export_report(self, path: Path | str | None = None) -> Path:
        """Write the report by the path's suffix (.xlsx, .csv: the Images rows, .pdf: a page per
        slide) with the review columns and the slides' identities, verdicts and sign-offs; return
        the path written (beside the asked one when that is open in Excel).  Raises ReportError,
        or ValueError for another suffix."""
        return self.desk.export_report(path)

    def choose_export(self) -> None:
        choose_export(self, self.desk, self.notify)

    # =========================================================================================
    # Opening folders: dialog, recent, drag and drop
    def choose_folder(self) -> None:
        if folder := QFileDialog.getExistingDirectory(self, "Open a slide folder", self.settings.last_folder or str(Path.home())):
            self.open_from_ui(folder)

    def open_from_ui(self, folder: str | Path) -> None:
        try:
            self.open_folder(folder)
        except OSError as exc:
            self.notify(str(exc))

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        event.acceptProposedAction() if dropped_path(event.mimeData()) else event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        if (path := dropped_path(event.mimeData())) is None:
            return event.ignore()
        event.acceptProposedAction()
        self.open_from_ui(path)

    # =========================================================================================
    # Messages, closing
    def notify(self, message: str) -> None:
        """Tell the user without blocking: status bar, plus a non-modal box when on screen."""
        self.statusBar().showMessage(message, 20000)
        self.error_shown.emit(message)
        if self.isVisible():
            box = QMessageBox(QMessageBox.Icon.Warning, "bcc-desk", message, QMessageBox.StandardButton.Ok, self)
            box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
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
                self.choose_export()
                self.desk.export_pool.waitForDone()
        self.shutdown()
        self.settings.save_window(self, self.splitter)
        self.settings.sync()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the run, the watch and the helper threads (closing the window does this; the
        folder watched now is watched again when next opened)."""
        self.desk.shutdown()
        self.status_area.show_watch(None)
        self.thumbnails.wait()
        self.image_pane.shutdown()


def dropped_path(mime: QMimeData | None) -> Path | None:
    """The first local folder or file a drag carries (None: nothing to open)."""
    paths = [Path(u.toLocalFile()) for u in (mime.urls() if mime is not None and mime.hasUrls() else []) if u.isLocalFile()]
    return next((p for p in paths if p.is_dir() or p.is_file()), None)
