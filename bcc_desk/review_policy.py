"""When a person must look at an image: the one rule every front end applies (issue #38).

The classifier flags each image alone as it makes it (low confidence against the bundle's cut-off,
unfamiliar features, colours unlike training).  With the slide's consensus on, a slide's images
are then judged together (`bcc_desk.slides.with_slide_consensus`): an image that disagrees with its
slide is flagged, one that agrees is held to the slide cut-off, one alone in its slide to its own.
`bcc classify`, the watch's report, the app's review session and the trainer's evaluation all call
`ReviewPolicy.apply`, with the policy the run's classifier made (`Classifier.review_policy`) or the
run record kept (`RunInfo.review_policy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bcc_desk.bundle_meta import BundleMeta
from bcc_desk.prediction import Prediction
from bcc_desk.slides import with_slide_consensus


@dataclass(frozen=True)
class ReviewPolicy:
    """The cut-off for an image judged alone, and for an image that agrees with its slide (None:
    the slide's consensus is off, every image is judged alone)."""

    alone: float
    in_slide: float | None = None

    @classmethod
    def of_bundles(cls, metas: Sequence[BundleMeta], threshold: float | None = None, consensus: bool = True) -> ReviewPolicy:
        """The bundles' own cut-offs (an ensemble's members: the strictest of each), or the user's
        `threshold` for every image; `consensus` off judges every image alone."""
        if threshold is not None:
            return cls(threshold, threshold if consensus else None)
        in_slide = max(m.review_threshold if m.slide_review_threshold is None else m.slide_review_threshold for m in metas)
        return cls(max(m.review_threshold for m in metas), in_slide if consensus else None)

    @property
    def consensus(self) -> bool:
        return self.in_slide is not None

    def apply(self, predictions: Sequence[Prediction]) -> list[Prediction]:
        """`predictions` flagged as their slides now stand; run it again whenever a slide grows.
        With the consensus off, `predictions` as they are (each flagged alone when it was made)."""
        if self.in_slide is None:
            return list(predictions)
        return with_slide_consensus(predictions, self.alone, self.in_slide)
