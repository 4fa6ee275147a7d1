"""The one record every front end shares: what the model said about one image.

The same `Prediction` feeds the CLI summary, the Excel/CSV rows, the daemon's ledger and the
GUI table, so a column means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bcc_desk.safe_text import name_text

REVIEW_LOW_CONFIDENCE = "low confidence"
REVIEW_UNFAMILIAR = "unlike training data"
REVIEW_UNREADABLE = "unreadable"
REVIEW_DISAGREES = "disagrees with its slide"
NO_ANSWER = "the model's output is not a number (its bundle is damaged): no label"
"""The error of an image whose probabilities came out NaN or infinite: never a label."""
REVIEW_COLOUR = "colours unlike training: re-stain, white-balance, or retrain on your slides"


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's outcome.  `label` is None exactly when `error` is set."""

    path: Path
    """Absolute path of the image."""
    file: str
    """Path relative to the chosen root, with forward slashes."""
    slide: str
    """Folder of the image relative to the root; the root's own name for images directly in it."""
    label: str | None
    confidence: float | None
    """Calibrated probability of `label`."""
    margin: float | None
    """`confidence` minus the runner-up class's probability."""
    probabilities: dict[str, float]
    """Every class's calibrated probability, in the model's class order (empty on error)."""
    needs_review: bool
    review_reason: str
    """Why a person must look ('' when not flagged); several reasons joined by '; '."""
    error: str | None
    """One-line reason the image could not be classified."""
    model: str
    model_sha256: str
    classified_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    ood_score: float | None = None
    """Distance of the image's features from the training data (higher is stranger), when the
    bundle carries an out-of-distribution check."""
    colour_score: float | None = None
    """Distance of the image's colours from the training set's over the colour check's cut-off
    (above 1: flagged, `bcc_desk.colour`), when the bundle carries the check."""

    @property
    def ok(self) -> bool:
        return self.error is None


def relative_location(path: Path, root: Path) -> tuple[str, str]:
    """(file, slide) of `path` under `root`: the report's two location columns.  A path that is
    not under `root` as spelled (a symlink or a differently spelled root) is tried resolved, and
    otherwise reported by its full path rather than failing the run."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        try:
            rel = path.resolve().relative_to(root.resolve())
        except (ValueError, OSError):
            return name_text(path.as_posix()), name_text(path.parent.name)
    parent = rel.parent.as_posix()
    slide = root.name if parent == "." else parent
    return name_text(rel.as_posix()), name_text(slide)


def error_prediction(path: Path, root: Path, error: str, model: str, model_sha256: str) -> Prediction:
    """The record for an image that could not be classified."""
    file, slide = relative_location(path, root)
    return Prediction(
        path=path,
        file=file,
        slide=slide,
        label=None,
        confidence=None,
        margin=None,
        probabilities={},
        # A person must look at an image the model could not read (the `error` column says why);
        # it is also counted as unreadable, apart from the classified ones.
        needs_review=True,
        review_reason=REVIEW_UNREADABLE,
        error=error,
        model=model,
        model_sha256=model_sha256,
    )
