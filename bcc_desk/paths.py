"""Where things live: shipped resources and the per-user data directory."""

from __future__ import annotations

from pathlib import Path

import platformdirs

APP_NAME = "bcc-desk"
RESOURCES = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_MODEL_DIR = RESOURCES / "models" / "default"
SAMPLES_DIR = RESOURCES / "samples"


def user_data_dir() -> Path:
    """Per-user state (ledgers, logs): the only place we write besides the user's folders."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
