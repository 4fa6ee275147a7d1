"""The trainer's verdict on a bundle (issue #37): "fit for use" only where validation was large
enough to measure the model and it passed there; otherwise "not validated", with the reasons.

The rule, stated once (`RULE`) and stored with every verdict:

* validation holds at least `MIN_VAL_PER_CLASS` images of every class: fewer cannot tell a
  useful model from a lucky one (the Wilson interval of 20 images right spans 84-100%);
* the review promise holds on validation: the images left unflagged by the review threshold are
  at least 99% right in every numerics the application runs (`val_accuracy_unflagged`), with at
  most `MAX_FLAGGED` of them flagged for low confidence (counting one assumed error, so at least
  `MIN_FOR_PROMISE` images must be left unflagged: about 132 validation images at the least);
* the Wilson 95% lower bound of the validation accuracy is at least `ACCURACY_FLOOR`.

It reads what `fit`, `ensemble` and `bcc-train int8` record in the bundle's metrics, so it judges
any bundle the trainer wrote (`bcc-train verdict`), the shipped one included.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from bcc_desk.bundle import read_meta, record_thresholds, record_verdict
from bcc_desk.bundle_meta import BundleMeta, Verdict
from bcc_desk.stats import wilson_interval
from trainer.split import Split

log = logging.getLogger("bcc-train")

MIN_VAL_PER_CLASS = 20
MIN_FOR_PROMISE = 99
"""The review threshold counts one more error than validation shows (trainer.metrics'
`choose_review_threshold`): (0 + 1) / (99 + 1) is the first share within 1%."""
ACCURACY_FLOOR = 0.85
MAX_FLAGGED = 0.25
TARGET = 0.99
RULE = (f"fit for use when validation holds at least {MIN_VAL_PER_CLASS} images of every class, the images its review "
        f"threshold leaves unflagged are at least {TARGET:.0%} right there in every numerics the application runs with at "
        f"most {MAX_FLAGGED:.0%} flagged, and the Wilson 95% lower bound of its validation accuracy is at least "
        f"{ACCURACY_FLOOR:.0%}")


def judge(meta: BundleMeta, val_classes: Sequence[str]) -> Verdict:
    """The verdict on `meta`'s recorded validation figures; `val_classes` is the true class of
    each validation image (folder or display names)."""
    reasons = []
    counts = Counter(meta.class_index(c) for c in val_classes)
    per_class = {label: counts.get(i, 0) for i, label in enumerate(meta.labels)}
    small = {c: n for c, n in per_class.items() if n < MIN_VAL_PER_CLASS}
    if small:
        reasons.append(f"validation too small to measure it ({', '.join(f'{c}: {n}' for c, n in small.items())} images; "
                       f"at least {MIN_VAL_PER_CLASS} of each class needed)")
    n = sum(per_class.values())
    accuracy = meta.metrics.get("val_accuracy")
    if not isinstance(accuracy, (int, float)) or n == 0:
        reasons.append("no validation accuracy recorded")
    else:
        low = wilson_interval(round(accuracy * n), n)[0]
        if low < ACCURACY_FLOOR:
            reasons.append(f"validation accuracy {accuracy:.1%} of {n} images (95% CI from {low:.1%}), under the floor "
                           f"of {ACCURACY_FLOOR:.0%}")
    reasons += _promise(meta.metrics, n)
    return Verdict(fit_for_use=not reasons, reasons=reasons, rule=RULE)


def _promise(metrics: Mapping[str, object], n: int) -> list[str]:
    unflagged = metrics.get("val_accuracy_unflagged")
    flagged = metrics.get("val_flagged_low_confidence")
    if not isinstance(unflagged, dict) or not unflagged or not isinstance(flagged, (int, float)):
        return ["no review promise recorded on validation"]
    short = {k: v for k, v in unflagged.items() if not isinstance(v, (int, float)) or v < TARGET}
    if short or flagged > MAX_FLAGGED + 1e-9:
        right = ", ".join(f"{v:.1%} ({k})" if isinstance(v, (int, float)) else f"none ({k})" for k, v in unflagged.items())
        reason = (f"the review promise does not hold on validation: unflagged {right} right with {flagged:.0%} flagged "
                  f"(at least {TARGET:.0%} right with at most {MAX_FLAGGED:.0%} flagged needed)")
        if n < MIN_FOR_PROMISE:
            reason += (f"; {n} validation images cannot show it: counting one assumed error, at least {MIN_FOR_PROMISE} "
                       "must be left unflagged")
        return [reason]
    return []


def judge_bundle(bundle_dir: Path, split: Split) -> Verdict:
    """Judge the bundle at `bundle_dir` on its recorded figures and `split`'s validation part, and
    record the verdict in it (the last step of `fit` and `ensemble`)."""
    meta = read_meta(bundle_dir)
    truth = [split.classes[i] for i in split.labels("val")]
    verdict = judge(meta, truth)
    counts = Counter(meta.class_index(c) for c in truth)
    # the n behind every validation figure, for the intervals `bcc info` shows
    record_thresholds(bundle_dir, {"val_images": len(truth),
                                   "val_per_class": {label: counts.get(i, 0) for i, label in enumerate(meta.labels)}})
    record_verdict(bundle_dir, verdict)
    if not verdict.fit_for_use:
        log.warning("the model is NOT VALIDATED: %s", "; ".join(verdict.reasons))
    return verdict
