"""The Slides pane as a dock: each slide's counts, verdict, identity and sign-off (`SlideSummary`),
with the actions on the selected slide: its details (written to the folder's slides.csv), sign
and remove the signature.  The session keeps all of it; the pane shows it and asks for it."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QDockWidget, QWidget

from bcc_desk.gui.settings import AppSettings
from bcc_desk.gui.slide_summary import SlideDetailsDialog, SlideSummary
from bcc_desk.lab_records import Signature, SlideIdentity
from bcc_desk.review import ReviewSession


class SlideDock(QDockWidget):
    """The Slides dock; `notice` for what the user must read, `status` for what the status bar says."""

    notice = Signal(str)
    status = Signal(str)

    def __init__(self, session: ReviewSession, settings: AppSettings, parent: QWidget | None = None) -> None:
        super().__init__("Slides", parent)
        self.setObjectName("slides-dock")
        self.session = session
        self.settings = settings
        self.dialog: SlideDetailsDialog | None = None
        """The identity dialog open now (non-modal), if any."""
        self.details_action = self._action("Slide &details\u2026", lambda: self.edit_details(),
                                           "Patient id, accession, specimen date and note of the selected slide "
                                           "(kept in the folder's slides.csv)")
        self.sign_action = self._action("&Sign slide", lambda: self._from_ui(self.sign),
                                        "Sign the selected slide as reviewed, with the reviewer's name and the time now")
        self.unsign_action = self._action("Remove si&gnature", lambda: self._from_ui(self.unsign),
                                          "Remove the selected slide's signature")
        self.summary = SlideSummary()
        self.summary.add_actions(self.actions_on_slide())
        self.summary.slide_selected.connect(lambda _slide: self.update_actions())
        self.summary.details_requested.connect(self.edit_details)
        self.setWidget(self.summary)
        self.update_actions()

    def _action(self, text: str, slot, tip: str) -> QAction:
        action = QAction(text, self)
        action.setStatusTip(tip)
        action.setToolTip(tip)
        action.triggered.connect(slot)
        return action

    def actions_on_slide(self) -> list[QAction]:
        return [self.details_action, self.sign_action, self.unsign_action]

    def selected_slide(self) -> str | None:
        """The slide selected in the pane (None for none)."""
        return self.summary.selected_slide()

    def _slide_or_selected(self, slide: str | None) -> str:
        slide = slide if slide is not None else self.selected_slide()
        if slide is None:
            raise ValueError("select a slide in the Slides pane first")
        return slide

    def refresh(self, classes: list[str]) -> None:
        self.summary.refresh(classes, self.session.slide_counts(), self.session.lab_records())
        self.update_actions()

    def update_actions(self) -> None:
        slide = self.selected_slide()
        signed = slide is not None and self.session.signature(slide) is not None
        self.details_action.setEnabled(slide is not None)
        self.sign_action.setEnabled(slide is not None and not signed)
        self.unsign_action.setEnabled(signed)

    def set_identity(self, slide: str, identity: SlideIdentity) -> Path | None:
        """Give `slide` its identity, written to the folder's slides.csv (returns its path).
        Raises SlidesFileError for a bad field and OSError when the file cannot be written; the
        identity is then unchanged."""
        return self.session.set_identity(slide, identity)

    def edit_details(self, slide: str | None = None) -> SlideDetailsDialog | None:
        """Open the identity dialog of `slide` (default: the selected one), non-modal; its OK
        saves through `set_identity`.  Returns the dialog (None when no slide is chosen)."""
        try:
            slide = self._slide_or_selected(slide)
        except ValueError as exc:
            self.notice.emit(str(exc))
            return None
        if self.dialog is not None:
            self.dialog.close()
        dialog = SlideDetailsDialog(slide, self.session.identities.get(slide, SlideIdentity()),
                                    lambda identity: self._save_identity(slide, identity), self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.destroyed.connect(lambda _=None: setattr(self, "dialog", None))
        self.dialog = dialog
        dialog.open()
        return dialog

    def _save_identity(self, slide: str, identity: SlideIdentity) -> None:
        path = self.set_identity(slide, identity)
        if path is not None:
            self.status.emit(f"Slide {slide}: details saved in {path}")

    def sign(self, slide: str | None = None) -> Signature:
        """Sign `slide` (default: the selected one) as reviewed: the reviewer's name (Review \u203a
        Reviewer name, or the login name) and the time now.  A review changed afterwards in the
        slide clears the signature.  Raises ValueError for no such slide."""
        slide = self._slide_or_selected(slide)
        signature = self.session.sign(slide, self.settings.reviewer)
        self.status.emit(f"Slide {slide} signed by {signature.by}.")
        return signature

    def unsign(self, slide: str | None = None) -> None:
        """Remove the signature of `slide` (default: the selected one)."""
        self.session.unsign(self._slide_or_selected(slide))

    def _from_ui(self, act) -> None:
        try:
            act()
        except ValueError as exc:
            self.notice.emit(str(exc))
