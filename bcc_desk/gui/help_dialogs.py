"""Help > Keyboard shortcuts and Help > About: what the window says about itself, read from its
actions and buttons so the list cannot go stale."""

from __future__ import annotations

from html import escape

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QMainWindow,
    QMenu,
    QMessageBox,
    QTableWidget,
    QTableWidgetItem,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from bcc_desk import __version__
from bcc_desk.paths import RESOURCES


def keyboard_shortcuts(window: QMainWindow) -> list[tuple[str, str]]:
    """(keys, what they do) for every shortcut `window` has now: its menus in menu order, its
    window-wide actions, toolbars and buttons with a shortcut."""
    actions: list[QAction] = []

    def walk(menu_actions: list[QAction]) -> None:  # in menu order, into sub-menus
        for action in menu_actions:
            actions.append(action)
            if isinstance(menu := action.menu(), QMenu):
                walk(menu.actions())

    walk(window.menuBar().actions())
    actions.extend(window.actions())  # window-wide keys that no menu shows
    for tools in window.findChildren(QToolBar):
        actions.extend(tools.actions())
    found: list[tuple[str, str]] = []
    for action in actions:
        for keys in action.shortcuts():
            found.append((keys.toString(QKeySequence.SequenceFormat.NativeText), _plain(action.text())))
    for button in window.findChildren(QAbstractButton):  # e.g. the image pane's Grad-CAM toggle
        if not button.shortcut().isEmpty():
            what = _plain(button.text()) + (f": {button.toolTip()}" if button.toolTip() else "")
            found.append((button.shortcut().toString(QKeySequence.SequenceFormat.NativeText), what))
    return list(dict.fromkeys(found))  # an action in a menu and a toolbar once


def shortcuts_dialog(parent: QWidget, shortcuts: list[tuple[str, str]]) -> QDialog:
    """A small non-modal table of `shortcuts`, deleted when closed."""
    dialog = QDialog(parent)
    dialog.setWindowTitle("Keyboard shortcuts \u2014 bcc-desk")
    dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    table = QTableWidget(len(shortcuts), 2, dialog)
    table.setObjectName("shortcuts")
    table.setHorizontalHeaderLabels(["Keys", "Action"])
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
    table.horizontalHeader().setStretchLastSection(True)
    for r, (keys, what) in enumerate(shortcuts):
        table.setItem(r, 0, QTableWidgetItem(keys))
        table.setItem(r, 1, QTableWidgetItem(what))
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, dialog)
    buttons.rejected.connect(dialog.close)
    layout = QVBoxLayout(dialog)
    layout.addWidget(table)
    layout.addWidget(buttons)
    dialog.resize(480, 420)
    return dialog


def about_text() -> str:
    """The About box's text (rich text), with a link to the documentation shipped with it."""
    readme = RESOURCES.parent / "README.md"
    doc = "Documentation: README.md in the installation folder"
    if readme.is_file():
        doc += f": <a href=\"{QUrl.fromLocalFile(str(readme)).toString()}\">{escape(str(readme), quote=False)}</a>"
    return (f"<p><b>bcc-desk {__version__}</b><br>B-ALL blood smear image classifier.</p>"
            "<p>Research software: a decision aid for trained staff, not a diagnostic device.</p>"
            f"<p>{doc}</p><p>Keyboard shortcuts: Help \u203a Keyboard shortcuts.</p>")


def about_box(parent: QWidget) -> QMessageBox:
    """Help > About, deleted when closed; its documentation link opens."""
    box = QMessageBox(QMessageBox.Icon.Information, "About bcc-desk", about_text(), QMessageBox.StandardButton.Ok, parent)
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)  # the link opens
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    return box


def _plain(text: str) -> str:
    """A menu text as a sentence: no '&' mnemonics, no trailing ellipsis."""
    return text.replace("&&", "\0").replace("&", "").replace("\0", "&").rstrip("\u2026").strip()
