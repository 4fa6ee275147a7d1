"""Per-slide counts and the one slide order: the report's Slides sheet, the console summary
after `bcc classify` and the desktop app's slide table all count here, so they cannot disagree.
And the slide's consensus: every field of a slide carries its patient's diagnosis, so a field the
model calls otherwise than most of its slide is one a person must look at.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bcc_desk.prediction import REVIEW_COLOUR, REVIEW_DISAGREES, REVIEW_LOW_CONFIDENCE, Prediction

SLIDE_COLOUR_SHARE = 0.5
"""A slide more than this share of whose classified images fail the colour check is unlike the
training set's as a whole (another stain or camera, not an odd field): its row says so once."""


def natural_key(s: str) -> tuple[list[object], str]:
    """Sort key so that img2 comes before img10, as a person expects; names equal but for case
    or leading zeros keep a fixed order.  The one slide order of the report, console and app."""
    parts = re.split(r"(\d+)", s)
    return [int(t) if i % 2 else t.casefold() for i, t in enumerate(parts)], s


@dataclass
class SlideCount:
    """One slide's images: how many, of which class, flagged, unreadable, reviewed by a person."""

    images: int = 0
    flagged: int = 0
    unreadable: int = 0
    reviewed: int = 0
    colour_unlike: int = 0
    """Classified images whose colours are unlike the training set's (the colour check)."""
    per_class: dict[str, int] = field(default_factory=dict)
    """Images per class: the reviewer's label where a person gave one, the model's elsewhere."""

    @property
    def classified(self) -> int:
        return self.images - self.unreadable

    def add(self, p: Prediction, reviewed_as: str | None = None) -> None:
        self.images += 1
        if p.error is not None:
            self.unreadable += 1
        if p.needs_review:  # unreadable images are flagged too: a person must look
            self.flagged += 1
        if reviewed_as is not None:
            self.reviewed += 1
        if p.colour_score is not None and p.colour_score > 1.0 and p.error is None:
            self.colour_unlike += 1
        label = reviewed_as if reviewed_as is not None else p.label
        if label is not None:
            self.per_class[label] = self.per_class.get(label, 0) + 1

    def share(self, label: str) -> float | None:
        """`label`'s share of the classified images (None when none could be classified)."""
        return self.per_class.get(label, 0) / self.classified if self.classified else None

    @property
    def note(self) -> str:
        """What a reader of the slide's row must know first ('' when nothing): a slide whose
        colours are unlike training says so here, once, rather than only on each image."""
        if self.classified and self.colour_unlike > SLIDE_COLOUR_SHARE * self.classified:
            return f"{self.colour_unlike} of {self.classified} fields: {REVIEW_COLOUR}"
        return ""

    def __iadd__(self, other: SlideCount) -> SlideCount:
        self.images += other.images
        self.colour_unlike += other.colour_unlike
        self.flagged += other.flagged
        self.unreadable += other.unreadable
        self.reviewed += other.reviewed
        for label, n in other.per_class.items():
            self.per_class[label] = self.per_class.get(label, 0) + n
        return self


def count_slides(predictions: Iterable[Prediction], reviewed: Mapping[Path, str] | None = None) -> dict[str, SlideCount]:
    """Slide name -> its counts, slides in natural order (slide-2 before slide-10).  `reviewed`
    (image path -> a person's label) replaces the model's label of those images."""
    slides: dict[str, SlideCount] = {}
    for p in predictions:
        slides.setdefault(p.slide, SlideCount()).add(p, reviewed.get(p.path) if reviewed else None)
    return {name: slides[name] for name in sorted(slides, key=natural_key)}


def all_slides(counts: Mapping[str, SlideCount]) -> SlideCount:
    """The counts of every slide together (the report's total row, the app's status bar)."""
    total = SlideCount()
    for count in counts.values():
        total += count
    return total


def disagrees_with_slide(slides: Sequence[Hashable], labels: Sequence[str | None]) -> list[bool]:
    """Per image, whether it disagrees with its slide.  A slide's label is the one that more than
    half of its classified images (label not None) have; an image with another label is flagged,
    and so is every classified image of a slide where no label has more than half.  A slide of a
    single classified image has nothing to disagree with; unclassified images are never flagged
    here (they are flagged as unreadable)."""
    if len(slides) != len(labels):
        raise ValueError(f"{len(slides)} slides but {len(labels)} labels")
    votes: dict[Hashable, Counter[str]] = {}
    for slide, label in zip(slides, labels, strict=True):
        if label is not None:
            votes.setdefault(slide, Counter())[label] += 1
    majority: dict[Hashable, str | None] = {}
    for slide, counts in votes.items():
        label, n = counts.most_common(1)[0]
        majority[slide] = label if 2 * n > counts.total() else None
    return [label is not None and votes[slide].total() > 1 and label != majority[slide]
            for slide, label in zip(slides, labels, strict=True)]


def with_slide_consensus(predictions: Sequence[Prediction], alone: float, in_slide: float) -> list[Prediction]:
    """`predictions` flagged as their slides now stand: "disagrees with its slide" where an image
    does (`disagrees_with_slide`), and "low confidence" below `in_slide` for an image of a slide
    of two or more classified images, below `alone` for one alone in its slide (the consensus
    cannot vouch for it).  Both are taken away where they no longer hold, so it is run again as a
    slide fills up; other reasons and unreadable images are left as they are."""
    flags = disagrees_with_slide([p.slide for p in predictions], [p.label for p in predictions])
    classified = Counter(p.slide for p in predictions if p.label is not None)
    out = []
    for p, flag in zip(predictions, flags, strict=True):
        if p.label is None or p.confidence is None:
            out.append(p)
            continue
        cut = in_slide if classified[p.slide] > 1 else alone
        others = [r for r in p.review_reason.split("; ") if r and r not in (REVIEW_LOW_CONFIDENCE, REVIEW_DISAGREES)]
        low = p.confidence < cut or cut >= 1.0  # a cut-off of 1.0 flags every image, even one at 100%
        reasons = ([REVIEW_LOW_CONFIDENCE] if low else []) + others + ([REVIEW_DISAGREES] if flag else [])
        reason = "; ".join(reasons)
        out.append(p if reason == p.review_reason else replace(p, needs_review=bool(reasons), review_reason=reason))
    return out
