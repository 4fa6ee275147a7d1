"""A slide's verdict (#36): the call a haematologist reads, and its honest refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from scipy.stats import binomtest

from bcc_desk.prediction import REVIEW_COLOUR, Prediction, error_prediction
from bcc_desk.slides import SlideCount
from bcc_desk.stats import wilson_interval
from bcc_desk.verdict import MIN_FIELDS, NO_MAJORITY, REVIEW_SHARE, TOO_FEW, slide_verdict

ROOT = Path("/lab/run")


def field(label: str, i: int, reason: str = "", colour: float | None = None) -> Prediction:
    return Prediction(path=ROOT / "s" / f"{label}-{i}.jpg", file=f"s/{label}-{i}.jpg", slide="s", label=label,
                      confidence=0.99, margin=0.9, probabilities={label: 0.99}, needs_review=bool(reason),
                      review_reason=reason, error=None, model="m", model_sha256="0" * 64, colour_score=colour)


def slide(*fields: Prediction) -> SlideCount:
    count = SlideCount()
    for p in fields:
        count.add(p)
    return count


def test_the_call_in_a_labs_words():
    count = slide(*(field("Pro-B", i) for i in range(34)), *(field("Pre-B", i) for i in range(2)))
    v = slide_verdict(count)
    assert (v.label, v.count, v.classified) == ("Pro-B", 34, 36)
    assert v.call == "Pro-B: 34 of 36 fields (94%, 95% CI 82-98%)"
    assert v.to_review == () and v.text == v.call


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (3, 7), (34, 36), (36, 36), (50, 400)])
def test_wilson_interval_is_scipys(k, n):
    want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((want.low, want.high), abs=1e-9)


def test_a_tie_is_no_majority_and_must_be_reviewed():
    v = slide_verdict(slide(*(field("Benign", i) for i in range(3)), *(field("Pro-B", i) for i in range(3))))
    assert (v.label, v.status) == (None, NO_MAJORITY)
    assert v.call == "no majority: no label has more than half of 6 fields"
    assert "no label has a majority" in v.to_review


def test_one_image_is_too_few():
    v = slide_verdict(slide(field("Benign", 0)))
    assert (v.label, v.status, v.classified) == (None, TOO_FEW, 1)
    assert v.call == f"too few images: 1 classified, at least {MIN_FIELDS} needed"
    assert v.text.startswith(v.call + "; to review: ")


def test_all_unreadable_gives_no_call_and_says_why():
    count = slide(*(error_prediction(ROOT / "s" / f"{i}.jpg", ROOT, "truncated", "m", "0" * 64) for i in range(6)))
    v = slide_verdict(count)
    assert (v.label, v.status, v.classified) == (None, TOO_FEW, 0)
    assert "6 of 6 fields flagged (over 10%)" in v.to_review


def test_all_flagged_keeps_the_call_but_marks_the_slide():
    v = slide_verdict(slide(*(field("Pre-B", i, reason="low confidence") for i in range(8))))
    assert v.label == "Pre-B" and v.call.startswith("Pre-B: 8 of 8 fields (100%")
    assert v.review_text == "to review: 8 of 8 fields flagged (over 10%)"


def test_the_review_share_is_a_bound_not_a_habit():
    """Exactly a tenth flagged is not over a tenth; one more is."""
    ten = [field("Benign", i) for i in range(9)] + [field("Benign", 9, reason="low confidence")]
    assert slide_verdict(slide(*ten)).to_review == ()
    assert REVIEW_SHARE == 0.10
    ten[0] = field("Benign", 0, reason="low confidence")
    assert slide_verdict(slide(*ten)).to_review == ("2 of 10 fields flagged (over 10%)",)


def test_a_slide_unlike_training_in_colour_is_to_review():
    fields = [field("Benign", i, reason=REVIEW_COLOUR, colour=2.0) for i in range(6)]
    assert "colours unlike training" in slide_verdict(slide(*fields)).to_review


def test_a_share_needs_a_denominator():
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
