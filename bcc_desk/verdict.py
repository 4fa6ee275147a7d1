"""A slide's verdict: what its fields say together, in words a lab reads.

One function, `slide_verdict`, makes it from a slide's counts (`bcc_desk.slides.SlideCount`), so
the report's Slides sheet, its PDF page, the console table after `bcc classify`, `bcc watch`'s
report and the desktop app's slide pane cannot disagree.  Every field of a slide carries its
patient's diagnosis, so the slide's call is the label more than half of its classified fields
have; the interval says how far that share can be trusted on so few fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from bcc_desk.slides import SlideCount
from bcc_desk.stats import wilson_interval

MIN_FIELDS = 5
"""Fewer classified fields than this give no call: one or two fields say nothing of a slide."""
REVIEW_SHARE = 0.10
"""A slide more than this share of whose fields are flagged (low confidence, unfamiliar, unlike
training in colour, disagreeing with the slide, unreadable) is marked "to review"."""
DECISION_AID = "A decision aid for the reviewing haematologist, not a diagnosis."
"""The fixed sentence every verdict is shown with (report, PDF, app)."""

NO_MAJORITY = "no majority"
TOO_FEW = "too few images"


@dataclass(frozen=True)
class SlideVerdict:
    """One slide's call.  `label` is None when there is none: `status` then says why."""

    label: str | None
    status: str
    """The label itself, `NO_MAJORITY` or `TOO_FEW`."""
    count: int
    """Classified fields with `label` (0 without one)."""
    classified: int
    """Classified fields: the share's denominator."""
    interval: tuple[float, float] | None
    """Wilson 95% interval of `count / classified` (None without a label)."""
    to_review: tuple[str, ...]
    """Why a person must look at the slide before signing it (empty: nothing in particular)."""

    @property
    def share(self) -> float | None:
        return self.count / self.classified if self.label is not None and self.classified else None

    @property
    def call(self) -> str:
        """The verdict in one line: "Pro-B: 34 of 36 fields (94%, 95% CI 81-98%)"."""
        if self.label is None:
            if self.status == TOO_FEW:
                return f"{TOO_FEW}: {self.classified} classified, at least {MIN_FIELDS} needed"
            return f"{NO_MAJORITY}: no label has more than half of {self.classified} fields"
        lo, hi = self.interval or (0.0, 1.0)
        return (f"{self.label}: {self.count} of {self.classified} fields "
                f"({_pct(self.count / self.classified)}, 95% CI {_pct(lo, sign=False)}-{_pct(hi)})")

    @property
    def review_text(self) -> str:
        """"to review: ..." with its reasons, or '' when none."""
        return f"to review: {'; '.join(self.to_review)}" if self.to_review else ""

    @property
    def text(self) -> str:
        """The call and, where there is one, why the slide must be reviewed."""
        return f"{self.call}; {self.review_text}" if self.to_review else self.call


def slide_verdict(count: SlideCount) -> SlideVerdict:
    """`count`'s verdict.  Its labels are the reviewer's where a person gave one (as `count`
    holds them), so a reviewed slide's verdict is the reviewed one."""
    n = count.classified
    to_review: list[str] = []
    if count.images and count.flagged > REVIEW_SHARE * count.images:
        to_review.append(f"{count.flagged} of {count.images} fields flagged (over {_pct(REVIEW_SHARE)})")
    if count.note:
        to_review.append("colours unlike training")
    if n < MIN_FIELDS:
        return SlideVerdict(None, TOO_FEW, 0, n, None, (*to_review, "too few fields for a call"))
    label, k = max(count.per_class.items(), key=lambda item: item[1])
    if 2 * k <= n:
        return SlideVerdict(None, NO_MAJORITY, 0, n, None, (*to_review, "no label has a majority"))
    return SlideVerdict(label, label, k, n, wilson_interval(k, n), tuple(to_review))


def _pct(x: float, sign: bool = True) -> str:
    return f"{round(100 * x)}%" if sign else f"{round(100 * x)}"
