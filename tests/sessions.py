"""A folder classified into the app's review session, as bcc-desk does it (not a test module)."""

from __future__ import annotations

from pathlib import Path

from bcc_desk.bundle import load_bundle
from bcc_desk.images import discover_images
from bcc_desk.options import ClassifierOptions
from bcc_desk.review import ReviewSession
from bcc_desk.run_record import run_info


def classified_session(model: Path, root: Path) -> ReviewSession:
    """Every image under `root` classified on the CPU by the bundle at `model`, in a new session
    with the run's record (what the app's export writes on the Run sheet)."""
    classifier = ClassifierOptions(device="cpu").build(load_bundle(model))
    session = ReviewSession()
    session.classes = list(classifier.classes)
    session.start(root)
    session.run_info = run_info(classifier, root=root, command=f"bcc-desk {root}")
    session.add(list(classifier.predict_paths(discover_images(root), root)))
    return session
