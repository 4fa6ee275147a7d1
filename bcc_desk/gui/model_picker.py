"""Model > Model…: the model (or ensemble), device, TTA and review options of the next run and of
the watch; what a choice shows before anything loads; the question before a model its trainer
did not find fit for use runs (asked once per session, never remembered)."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QMessageBox, QWidget

from bcc_desk.bundle_meta import BundleError, BundleMeta, not_validated, read_meta, verdict_text
from bcc_desk.gui.desk import Desk
from bcc_desk.gui.model_dialog import ModelDialog
from bcc_desk.gui.models import unvalidated_question
from bcc_desk.gui.settings import AppSettings
from bcc_desk.options import RunSpec


class ModelPicker(QObject):
    """The Desk's model and options (`RunSpec`): `apply` makes it the one in use, `choose` asks for another,
    `confirm_choice` is what the Desk asks before a run or a watch starts."""

    applied = Signal(object, object)
    """A choice is in use (its bundles' metadata, those of them not validated); the session's
    classes are its first bundle's."""

    def __init__(self, parent: QWidget, desk: Desk, settings: AppSettings, notify: Callable[[str], None]) -> None:
        super().__init__(parent)
        self.parent_widget, self.desk, self.settings, self.notify = parent, desk, settings, notify
        self.unvalidated_box: QMessageBox | None = None
        """The question `confirm_unvalidated` asks, while it is asked."""

    def apply(self, spec: RunSpec) -> None:
        """Use `spec` and say what it means before anything is loaded (bundle.json only: instant)."""
        desk = self.desk
        desk.spec = spec
        try:
            metas = [read_meta(d) for d in spec.model_dirs]
        except BundleError as exc:
            self.notify(f"model: {exc}")
            metas = []
        unvalidated = not_validated(metas)
        desk.session.classes = list(metas[0].labels) if metas else []  # the names the classifier will report
        self.applied.emit(metas, unvalidated)
        # torch's import and the weights load now, while the user picks a folder (not for a model
        # that cannot run until the user confirms it)
        if metas and (spec.options.allow_unvalidated or not unvalidated):
            desk.engine.prepare(spec)

    def choose(self) -> None:
        parent, desk = self.parent_widget, self.desk
        dialog = ModelDialog(desk.spec, self.settings.known_models, parent)
        if dialog.exec() != ModelDialog.DialogCode.Accepted:
            return
        spec = dialog.spec()
        if unconfirmed := spec.unconfirmed():
            if not self.confirm_unvalidated(unconfirmed):
                return  # the model in use stays
            spec = spec.with_options(allow_unvalidated=True)
        self.set_spec(spec, remember=True)
        self.settings.known_models = dialog.listed_folders()
        if desk.root is not None and desk.session.predictions():
            answer = QMessageBox.question(parent, "bcc-desk", "Classify the open folder again with this model?")
            if answer == QMessageBox.StandardButton.Yes:
                desk.open_folder(desk.root)

    def set_spec(self, spec: RunSpec, remember: bool = False) -> None:
        """See `MainWindow.set_spec`."""
        self.apply(spec)
        if remember:  # all but `allow_unvalidated`: a confirmation holds for this session only
            self.settings.remember(spec)
        self.desk.restart_watch()  # a watch goes on with the new model

    def confirm_unvalidated(self, metas: list[BundleMeta]) -> bool:
        """Ask whether to run the bundles `metas` although they are not validated (Yes/No, No by
        default); True for Yes.  While asked, the box is `unvalidated_box`."""
        box = QMessageBox(QMessageBox.Icon.Warning, "bcc-desk \u2014 model not validated", unvalidated_question(metas),
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, self.parent_widget)
        box.setDefaultButton(QMessageBox.StandardButton.No)
        box.setEscapeButton(QMessageBox.StandardButton.No)
        self.unvalidated_box = box
        try:
            return box.exec() == QMessageBox.StandardButton.Yes
        finally:
            self.unvalidated_box = None
            box.deleteLater()

    def confirm_choice(self) -> bool:
        """Whether the model in use may run: validated, confirmed already, or confirmed now (for
        this session).  Declined: a message says why nothing runs and how to run it anyway."""
        unconfirmed = self.desk.spec.unconfirmed()
        if not unconfirmed:
            return True
        if self.confirm_unvalidated(unconfirmed):
            self.apply(self.desk.spec.with_options(allow_unvalidated=True))
            return True
        said = "; ".join(f"{m.name}: {verdict_text(m)}" for m in unconfirmed)
        self.notify(f"Not classified: the model is not validated ({said}). To run it anyway, confirm it in "
                    "Model \u203a Model\u2026, or choose another model there.")
        return False
