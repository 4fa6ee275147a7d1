"""Per-slide counts and the one slide order: the report's Slides sheet, the console summary
after `bcc classify` and the desktop app's slide table all count here, so they cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bcc_desk.prediction import Prediction


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
        label = reviewed_as if reviewed_as is not None else p.label
        if label is not None:
            self.per_class[label] = self.per_class.get(label, 0) + 1

    def share(self, label: str) -> float | None:
        """`label`'s share of the classified images (None when none could be classified)."""
        return self.per_class.get(label, 0) / self.classified if self.classified else None

    def __iadd__(self, other: SlideCount) -> SlideCount:
        self.images += other.images
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
