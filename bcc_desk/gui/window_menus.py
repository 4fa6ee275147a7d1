"""The window's actions, menus and toolbar: made, placed and enabled here; what each does is the
window's (or its parts') job, connected by the window.  The review keys (1-9 name a class, 0
clears) follow the model's classes; Help's dialogs and the small name questions live here too."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QDialog, QInputDialog, QMainWindow, QMenu, QMessageBox, QPushButton

from bcc_desk.gui.help_dialogs import about_box, keyboard_shortcuts, shortcuts_dialog
from bcc_desk.gui.palette import class_name
from bcc_desk.gui.settings import AppSettings


class WindowMenus:
    """Every QAction of `window`, its File/View/Review/Model/Help menus and its toolbar.
    `review(label)` gives the selected images a label (None clears); `open_recent(folder)`
    opens a folder from File > Open recent."""

    def __init__(self, window: QMainWindow, settings: AppSettings, review: Callable[[str | None], None],
                 open_recent: Callable[[str], None]) -> None:
        self.window, self.settings, self.review, self.open_recent = window, settings, review, open_recent
        self.open_action = self._action("&Open folder\u2026", QKeySequence.StandardKey.Open, "Classify every image in a slide folder")
        self.rerun_action = self._action("&Classify again", "F5", "Run the folder again (e.g. after changing the model)")
        self.cancel_action = self._action("Cancel", "Esc", "Stop classifying; the images done stay")
        self.export_action = self._action("&Export report\u2026", "Ctrl+E", "Write the Excel report with the review columns")
        self.model_action = self._action("&Model\u2026", "Ctrl+M", "Pick the model (or an ensemble), device, TTA and review threshold")
        self.flagged_first_action = self._action("&Flagged first", "Ctrl+R", "Sort flagged images first, least confident on top")
        self.clear_filters_action = self._action("Clear filters", "Ctrl+Shift+F")
        self.find_action = self._action("Search file names", QKeySequence.StandardKey.Find)
        self.watch_action = self._action("&Watch this folder", None,
                                         "Classify images as they arrive in the open folder, as bcc watch does")
        self.watch_action.setCheckable(True)
        self.reviewer_action = self._action("Reviewer &name\u2026", slot=self.ask_reviewer)
        self.lab_name_action = self._action("&Lab name\u2026", None, "The lab's name, printed at the head of the PDF report",
                                            self.ask_lab_name)
        self.quit_action = self._action("&Quit", QKeySequence.StandardKey.Quit, slot=window.close)
        self.clear_review_action = self._action("Clear the reviewed label", "0", slot=lambda: review(None))
        self.review_actions: list[QAction] = []
        self.shortcuts_action = self._action("&Keyboard shortcuts", QKeySequence.StandardKey.HelpContents,
                                             "Every key the window answers to", self.show_shortcuts)
        self.about_action = self._action("&About bcc-desk", slot=self.show_about)
        self.shortcuts_dialog: QDialog | None = None
        self.about_box: QMessageBox | None = None
        self._build_menus()
        self._build_toolbar()

    def _action(self, text: str, shortcut: str | QKeySequence | QKeySequence.StandardKey | None = None, tip: str = "",
                slot: Callable | None = None) -> QAction:
        action = QAction(text, self.window)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip)
        if slot is not None:
            action.triggered.connect(slot)
        return action

    def _build_menus(self) -> None:
        bar = self.window.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addAction(self.open_action)
        self.recent_menu = QMenu("Open &recent", self.window)
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addMenu(self.recent_menu)
        for action in (self.rerun_action, self.watch_action, self.cancel_action, None, self.export_action,
                       self.lab_name_action, None, self.quit_action):
            file_menu.addAction(action) if action else file_menu.addSeparator()
        self.view_menu = bar.addMenu("&View")
        for action in (self.flagged_first_action, self.clear_filters_action, self.find_action):
            self.view_menu.addAction(action)
        self.review_menu = bar.addMenu("&Review")
        bar.addMenu("&Model").addAction(self.model_action)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self.shortcuts_action)
        help_menu.addAction(self.about_action)

    def _build_toolbar(self) -> None:
        tools = self.window.addToolBar("Main")
        tools.setObjectName("main-toolbar")
        tools.addAction(self.open_action)
        recent = QPushButton("Recent \u25be")
        recent.setFlat(True)
        recent.setMenu(self.recent_menu)
        tools.addWidget(recent)
        for action in (self.rerun_action, self.watch_action, None, self.model_action, self.flagged_first_action, None,
                       self.export_action):
            tools.addAction(action) if action else tools.addSeparator()

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        settings = self.settings
        for folder in settings.recent_folders:
            action = self.recent_menu.addAction(folder)
            action.triggered.connect(lambda _=False, f=folder: self.open_recent(f))
        if settings.recent_folders:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear the list", settings.clear_recent_folders)
        else:
            self.recent_menu.addAction("(none yet)").setEnabled(False)

    # -----------------------------------------------------------------------------------------
    # Review keys: one per class of the model in use
    def set_classes(self, classes: list[str], slide_actions: list[QAction]) -> None:
        """Keys 1-9 for the first nine classes, 0 to clear, then the slide's own actions."""
        window = self.window
        for action in self.review_actions:
            window.removeAction(action)
            action.deleteLater()
        self.review_menu.clear()
        self.review_actions = []
        for i, c in enumerate(classes[:9]):
            action = self._action(f"Reviewed as {class_name(c)}", str(i + 1), slot=lambda _=False, label=c: self.review(label))
            self.review_actions.append(action)
            window.addAction(action)  # the shortcut works wherever the focus is in the window
            self.review_menu.addAction(action)
        self.review_menu.addAction(self.clear_review_action)
        window.addAction(self.clear_review_action)
        self.review_menu.addSeparator()
        for action in slide_actions:
            self.review_menu.addAction(action)
        self.review_menu.addSeparator()
        self.review_menu.addAction(self.reviewer_action)

    def enable_review(self, enabled: bool) -> None:
        """The class keys only for an image a person can see (clearing stays possible)."""
        for action in self.review_actions:
            action.setEnabled(enabled)

    def show_watch(self, watching: bool, startable: bool) -> None:
        self.watch_action.setEnabled(watching or startable)
        self.watch_action.setChecked(watching)

    def show_running(self, running: bool, has_rows: bool, has_folder: bool) -> None:
        self.cancel_action.setEnabled(running)
        self.rerun_action.setEnabled(not running and has_folder)
        self.export_action.setEnabled(has_rows and not running)

    # -----------------------------------------------------------------------------------------
    # Small questions and Help
    def ask_reviewer(self) -> None:
        settings = self.settings
        name, ok = QInputDialog.getText(self.window, "Reviewer", "Name recorded with each review and sign-off:",
                                        text=settings.reviewer)
        if ok and name.strip():
            settings.reviewer = name

    def ask_lab_name(self) -> None:
        settings = self.settings
        name, ok = QInputDialog.getText(self.window, "Lab name", "The lab's name, printed at the head of the PDF report:",
                                        text=settings.lab_name)
        if ok:
            settings.lab_name = name

    def keyboard_shortcuts(self) -> list[tuple[str, str]]:
        """(keys, what they do) for every shortcut the window has now (`help_dialogs`)."""
        return keyboard_shortcuts(self.window)

    def show_shortcuts(self) -> None:
        """Help > Keyboard shortcuts: a small non-modal table of `keyboard_shortcuts()`."""
        if self.shortcuts_dialog is not None:
            self.shortcuts_dialog.close()
        dialog = shortcuts_dialog(self.window, self.keyboard_shortcuts())
        dialog.destroyed.connect(lambda _=None: setattr(self, "shortcuts_dialog", None))
        self.shortcuts_dialog = dialog
        dialog.show()

    def show_about(self) -> None:
        box = about_box(self.window)
        box.destroyed.connect(lambda _=None: setattr(self, "about_box", None))
        self.about_box = box
        box.open()
