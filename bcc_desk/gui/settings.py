"""What the app remembers between sessions, kept in QSettings.

Lists are stored as JSON text: QSettings' own list handling differs between the INI and native
back ends (a one-element list comes back as a plain string from INI files).  Tests hand the
window a QSettings on a temporary INI file, so they never touch the user's real configuration.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings
from PySide6.QtWidgets import QMainWindow, QSplitter

from bcc_desk.options import ClassifierOptions, RunSpec
from bcc_desk.paths import APP_NAME, DEFAULT_MODEL_DIR

MAX_RECENT = 10


def default_qsettings() -> QSettings:
    """The per-user settings file (registry on Windows, plist on macOS, INI on Linux)."""
    return QSettings(APP_NAME, APP_NAME)


def _switch(key: str, default: bool) -> property:
    """A remembered on/off choice of the model dialog."""
    return property(lambda self: self._bool(key, default), lambda self, on: self.q.setValue(key, bool(on)))


def current_user() -> str:
    # getpass fails in containers without a passwd entry; a review still needs a name.
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


class AppSettings:
    """Typed access to the keys the app uses."""

    def __init__(self, qsettings: QSettings | None = None) -> None:
        self.q = qsettings if qsettings is not None else default_qsettings()

    # -- helpers ------------------------------------------------------------------------------
    def _list(self, key: str) -> list[str]:
        raw = self.q.value(key, "")
        try:
            value = json.loads(raw) if isinstance(raw, str) and raw else []
        except json.JSONDecodeError:
            return []
        return [str(v) for v in value] if isinstance(value, list) else []

    def _set_list(self, key: str, values: list[str]) -> None:
        self.q.setValue(key, json.dumps(list(values)))

    def _bool(self, key: str, default: bool) -> bool:
        raw = self.q.value(key, default)
        if isinstance(raw, str):
            return raw.lower() in ("1", "true", "yes")
        return bool(raw)

    def _bytes(self, key: str) -> QByteArray | None:
        raw = self.q.value(key)
        return raw if isinstance(raw, QByteArray) and not raw.isEmpty() else None

    # -- folders ------------------------------------------------------------------------------
    @property
    def last_folder(self) -> str:
        return str(self.q.value("folders/last", "") or "")

    @property
    def recent_folders(self) -> list[str]:
        return self._list("folders/recent")

    def add_recent_folder(self, folder: Path) -> None:
        text = str(folder)
        recent = [text] + [f for f in self.recent_folders if f != text]
        self._set_list("folders/recent", recent[:MAX_RECENT])
        self.q.setValue("folders/last", text)

    def clear_recent_folders(self) -> None:
        self._set_list("folders/recent", [])

    # -- model --------------------------------------------------------------------------------
    @property
    def model_dirs(self) -> list[Path]:
        dirs = [Path(d) for d in self._list("model/dirs")]
        return dirs or [DEFAULT_MODEL_DIR]

    @model_dirs.setter
    def model_dirs(self, dirs: list[Path]) -> None:
        self._set_list("model/dirs", [str(d) for d in dirs])

    @property
    def known_models(self) -> list[Path]:
        """Bundle folders the user has added to the picker (the shipped one is always listed)."""
        return [Path(d) for d in self._list("model/known")]

    @known_models.setter
    def known_models(self, dirs: list[Path]) -> None:
        self._set_list("model/known", [str(d) for d in dirs])

    @property
    def device(self) -> str:
        return str(self.q.value("model/device", "auto") or "auto")

    @device.setter
    def device(self, value: str) -> None:
        self.q.setValue("model/device", value)

    tta = _switch("model/tta", False)
    slide_consensus = _switch("model/slide_consensus", True)

    @property
    def review_threshold(self) -> float | None:
        """The user's override of the model's review threshold (None: the model's own)."""
        raw = self.q.value("model/review_threshold", "")
        try:
            return float(raw) if isinstance(raw, (str, int, float)) and raw != "" else None
        except (TypeError, ValueError):
            return None

    @review_threshold.setter
    def review_threshold(self, value: float | None) -> None:
        self.q.setValue("model/review_threshold", "" if value is None else float(value))

    def run_spec(self, model_dirs: list[Path] | None = None) -> RunSpec:
        """The remembered model and options (`model_dirs`, given, overrides the folders)."""
        return RunSpec(tuple(model_dirs or self.model_dirs),
                       ClassifierOptions(device=self.device, tta=self.tta, review_threshold=self.review_threshold,
                                         slide_consensus=self.slide_consensus))

    def remember(self, spec: RunSpec) -> None:
        """The folders and the options the model dialog sets; never `allow_unvalidated` (a
        confirmation holds for one session only)."""
        self.model_dirs = list(spec.model_dirs)
        self.device = spec.options.device
        self.tta = spec.options.tta
        self.review_threshold = spec.options.review_threshold
        self.slide_consensus = spec.options.slide_consensus

    # -- review -------------------------------------------------------------------------------
    @property
    def reviewer(self) -> str:
        return str(self.q.value("review/reviewer", "") or "") or current_user()

    @reviewer.setter
    def reviewer(self, name: str) -> None:
        self.q.setValue("review/reviewer", name.strip())

    # -- report -------------------------------------------------------------------------------
    @property
    def lab_name(self) -> str:
        """The lab's name for the PDF report's header ('' for none)."""
        return str(self.q.value("report/lab_name", "") or "")

    @lab_name.setter
    def lab_name(self, name: str) -> None:
        self.q.setValue("report/lab_name", " ".join(name.split()))

    # -- watch --------------------------------------------------------------------------------
    @property
    def watched_folder(self) -> str:
        """The folder that was being watched when the app was last closed ('' for none): it is
        watched again when it is next opened."""
        return str(self.q.value("watch/folder", "") or "")

    @watched_folder.setter
    def watched_folder(self, folder: str) -> None:
        self.q.setValue("watch/folder", folder)

    # -- window -------------------------------------------------------------------------------
    def restore_window(self, window: QMainWindow, splitter: QSplitter) -> None:
        """The window's size, docks and splitter as last closed (a first start: 1400 x 880)."""
        geometry, state, split = self._bytes("window/geometry"), self._bytes("window/state"), self._bytes("window/splitter")
        if geometry is None:
            window.resize(1400, 880)
        for restore, saved in ((window.restoreGeometry, geometry), (window.restoreState, state), (splitter.restoreState, split)):
            if saved is not None:
                restore(saved)

    def save_window(self, window: QMainWindow, splitter: QSplitter) -> None:
        self.q.setValue("window/geometry", window.saveGeometry())
        self.q.setValue("window/state", window.saveState())
        self.q.setValue("window/splitter", splitter.saveState())

    def sync(self) -> None:
        self.q.sync()
