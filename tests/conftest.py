"""Shared fixtures: the real microscope images committed in tests/data and small real bundles."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Qt must never look for a display in the tests (set before anything imports Qt).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Ledgers, logs and compiled int8 packages go to a throw-away per-user data directory, never the
# tester's own (platformdirs reads XDG_DATA_HOME on Linux).
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="bcc-tests-data-")
atexit.register(shutil.rmtree, os.environ["XDG_DATA_HOME"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
# A real subset of the public data set, committed (tests/data/README.md): a fresh clone's tests
# need nothing beside the repository.
DATA = REPO / "tests" / "data"
ALL4 = DATA / "all4-mini"
OOD_DEV = DATA / "ood-dev"
CLASSES = ["Benign", "[Malignant] early Pre-B", "[Malignant] Pre-B", "[Malignant] Pro-B"]  # the folders
LABELS = ["Benign", "early Pre-B", "Pre-B", "Pro-B"]  # what every front end calls them
ALL4_COUNTS = dict(zip(CLASSES, (75, 75, 75, 90)))  # images per class in tests/data/all4-mini


@pytest.fixture(scope="session")
def all4() -> Path:
    assert ALL4.is_dir(), f"the committed test images are missing at {ALL4}"
    return ALL4


@pytest.fixture(scope="session")
def real_images(all4: Path) -> dict[str, list[Path]]:
    """A few real images per class folder, in a stable order."""
    return {c: sorted((all4 / c).glob("*.jpg"))[:6] for c in CLASSES}
