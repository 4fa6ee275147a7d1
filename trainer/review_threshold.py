"""The review and out-of-distribution thresholds, chosen on the numerics a lab runs.

`fit` first chooses the threshold on its own validation pass (the training reader, fp32 or bf16).
The application decodes images with its own reader and, on x86 CPUs, runs static int8: small
differences move images across the cut-off, and the shipped model's promise ("on validation,
the images it does not flag are at least 99% right") then held for the trainer's numbers, not
for what `bcc classify` gives (98.9% for the default model).  So once the bundle is written the
threshold is chosen again from the application's own predictions on validation, once per
precision the bundle ships for (fp32; int8 when it carries a checked calibration), and the
strictest of them is kept.  The out-of-distribution threshold is chosen the same way: `fit`
chose it to flag 5% of its own validation pass, and int8 moved one image of the shipped v4 model
across it (5.1% flagged in `bcc classify`), so it is raised where any numerics would flag more.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bcc_desk.bundle import BundleError, BundleMeta, load_bundle, read_meta, record_thresholds
from bcc_desk.classifier import Classifier, Prediction  # the trainer reaches the app through the engine
from bcc_desk.images import discover_images
from bcc_desk.slides import disagrees_with_slide
from trainer.metrics import choose_ood_threshold, choose_review_threshold, review_rule_on_halves, slide_floor
from trainer.split import Split

log = logging.getLogger("bcc-train")


def app_predictions(bundle_dir: Path | Sequence[Path], paths: list[Path], root: Path, precision: str, workers: int,
                    skip_unreadable: bool = False, tta: bool = False) -> list[Prediction]:
    """The application's predictions for `paths` on this CPU in `precision` (fp32 uncompiled, the
    reference; int8 compiled, as `bcc classify` runs it), by one bundle or an ensemble (several),
    with or without test-time augmentation.  A problem is a one-line ValueError; an unreadable
    image too, unless `skip_unreadable` (then it is left out, with a warning)."""
    dirs = [bundle_dir] if isinstance(bundle_dir, (str, Path)) else list(bundle_dir)
    try:
        clf = Classifier([load_bundle(d) for d in dirs], device="cpu", precision=precision, workers=workers,
                         compile=None if precision == "int8" else False, tta=tta)
    except BundleError as exc:
        raise ValueError(str(exc)) from None
    predictions = list(clf.predict_paths(paths, root))
    if precision == "int8" and not clf.int8_active:
        raise ValueError("int8 could not run on this machine (see the warning above)")
    bad = [p for p in predictions if not p.ok]
    if bad and not skip_unreadable:
        raise ValueError(f"{bad[0].path}: {bad[0].error}")
    if bad:
        log.warning("%d unreadable image(s) left out, e.g. %s: %s", len(bad), bad[0].path, bad[0].error)
    return [p for p in predictions if p.ok]


def choose_thresholds_on_fp32(bundle_dir: Path, data: Path, split: Split, workers: int = 2, ood_dir: Path | None = None) -> float:
    """`choose_thresholds` for a bundle without int8: on fp32 predictions alone."""
    meta = read_meta(bundle_dir)
    predictions = app_predictions(bundle_dir, [Path(data) / p for p in split.paths("val")], Path(data), "fp32", workers)
    return choose_thresholds(bundle_dir, validation_truth(split, meta), {"fp32": predictions},
                             ood_predictions(bundle_dir, ood_dir, ("fp32",), workers), split.groups("val"))


def ood_predictions(bundle_dir: Path, ood_dir: Path | None, precisions: Sequence[str], workers: int = 2
                    ) -> dict[str, list[Prediction]]:
    """The application's predictions on the foreign images of `ood_dir` (none without one), per
    precision: how many the chosen out-of-distribution check still catches.  An unreadable one is
    left out: it must not cost the bundle its thresholds or its int8."""
    if ood_dir is None or read_meta(bundle_dir).ood is None:
        return {}
    paths = discover_images(Path(ood_dir))
    by_precision = {p: app_predictions(bundle_dir, paths, Path(ood_dir), p, workers, skip_unreadable=True) for p in precisions}
    return {p: v for p, v in by_precision.items() if v}


def validation_truth(split: Split, meta: BundleMeta) -> list[str]:
    """The true class of each validation image of `split`, as the model names it
    (`Prediction.label`), in `split.paths('val')` order."""
    labels = meta.labels
    truth = []
    for i in split.labels("val"):
        index = meta.class_index(split.classes[i])
        if index is None:
            raise ValueError(f"the split has a class the model does not know: {split.classes[i]}")
        truth.append(labels[index])
    return truth


def choose_thresholds(
    bundle_dir: Path, truth: Sequence[str], by_precision: Mapping[str, Sequence[Prediction]],
    ood_dev: Mapping[str, Sequence[Prediction]] | None = None, groups: Sequence[int] | None = None,
) -> float:
    """Write into the bundle the strictest review threshold chosen (`choose_review_threshold`)
    on each precision's validation predictions; record each choice and the share flagged; and
    choose the out-of-distribution threshold on the same predictions (`raise_ood_threshold`).
    With the images' `groups` (the split's, standing in for slides), also choose the cut-off for
    an image that agrees with its slide (`BundleMeta.slide_review_threshold`) and record how often
    each rule's promise falls short on held-out halves of validation (`review_rule_on_halves`),
    for the data person to judge how far it will hold.  Returns the review threshold now in the
    bundle (for an image alone)."""
    if not by_precision:
        raise ValueError("no validation predictions to choose the review threshold on")
    chosen: dict[str, float] = {}
    scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for precision, predictions in by_precision.items():
        if len(predictions) != len(truth):
            raise ValueError(f"{len(predictions)} {precision} predictions for {len(truth)} validation images")
        conf = np.array([p.confidence for p in predictions], dtype=np.float64)
        right = np.array([p.label == t for p, t in zip(predictions, truth)])
        scored[precision] = conf, right
        chosen[precision] = choose_review_threshold(conf, right)
    threshold = max(chosen.values())
    flagged = {k: float((conf < threshold).mean()) for k, (conf, _) in scored.items()}
    unflagged_right = {k: float(right[conf >= threshold].mean()) if (conf >= threshold).any() else None
                       for k, (conf, right) in scored.items()}

    meta = read_meta(bundle_dir)
    before, ood_before = meta.review_threshold, meta.ood.threshold if meta.ood else None
    ood_after = raise_ood_threshold(bundle_dir, by_precision, ood_dev or {})
    metrics: dict[str, object] = {
        "review_threshold_by_precision": chosen,  # what each numerics alone would have chosen
        "val_flagged_low_confidence": max(flagged.values()),
        "val_accuracy_unflagged": unflagged_right,
    }
    unfamiliar = {k: _unfamiliar(v, ood_before, ood_after) for k, v in by_precision.items()}
    in_slides = threshold  # without the slides: every image is held to the one cut-off
    if groups is not None:
        # The slide's consensus (rule 18 of docs/default-model/recipe.md), the split's groups
        # standing in for slides: its disagreeing images are flagged whatever their confidence,
        # so the cut-off for the others is chosen among the images no other reason flags.
        disagree = {k: np.array(disagrees_with_slide(list(groups), [p.label for p in v])) for k, v in by_precision.items()}
        other = {k: unfamiliar[k] | disagree[k] for k in by_precision}
        by_slide = {k: choose_review_threshold(conf[~other[k]], right[~other[k]]) if (~other[k]).any() else threshold
                    for k, (conf, right) in scored.items()}
        in_slides = max(slide_floor(threshold), *by_slide.values())
        metrics["slide_review_threshold_by_precision"] = by_slide
        metrics["val_flagged_in_slides"] = max(float(((conf < in_slides) | other[k]).mean())
                                               for k, (conf, _) in scored.items())
        metrics["val_disagreeing_with_slide"] = max(float(v.mean()) for v in disagree.values())
    if groups is not None and len(set(groups)) > 1:  # a tiny split may hold one group: nothing to hold out
        halves = {k: review_rule_on_halves(conf, right, unfamiliar[k], np.asarray(groups))
                  for k, (conf, right) in scored.items()}
        short = {k: h["short_of_target"] for k, h in halves.items()}
        metrics["val_review_short_on_halves"] = short
        metrics["val_review_short_on_halves_in_slides"] = {
            k: review_rule_on_halves(conf, right, other[k], np.asarray(groups), choose_among_unflagged=True,
                                     floor=slide_floor(threshold))["short_of_target"]
            for k, (conf, right) in scored.items()}
        log.info("the review promise fell short on %s of held-out halves of validation (%s): how often "
                 "new images may find it short", " and ".join(f"{v:.0%}" for v in short.values()), " and ".join(short))
        deciding = {k: [list(g) for g in h["deciding_groups"]] for k, h in halves.items() if h["deciding_groups"]}
        if deciding:
            metrics["val_review_deciding_groups"] = deciding  # [group, short when held out, otherwise]
            files_of = [p.file for p in next(iter(by_precision.values()))]  # the same images in every numerics
            for group, held_out, otherwise in next(iter(deciding.values())):
                files = [f for f, g in zip(files_of, groups) if g == group]
                log.info("one group of validation decides most of that: %s … %s (%d images) is short on %.0f%% of the "
                         "halves holding it out, %.0f%% of the others; look at its confident errors",
                         files[0], files[-1], len(files), 100 * held_out, 100 * otherwise)
    record_thresholds(bundle_dir, metrics, review=threshold, slide_review=in_slides)
    log.info("review threshold %.4f (was %.4f), %.4f for an image agreeing with its slide: the strictest chosen on "
             "the application's %s predictions on validation", threshold, before, in_slides, " and ".join(chosen))
    return threshold


def raise_ood_threshold(
    bundle_dir: Path, by_precision: Mapping[str, Sequence[Prediction]], ood_dev: Mapping[str, Sequence[Prediction]]
) -> float | None:
    """Raise the bundle's out-of-distribution threshold where the application's validation
    predictions in some precision would flag more than `choose_ood_threshold` allows (it never
    lowers `fit`'s own choice); record each choice, the largest share of validation flagged and,
    with `ood_dev` (predictions on foreign images), the smallest share of those caught.  Returns
    the threshold now in the bundle (None: the bundle has no check)."""
    meta = read_meta(bundle_dir)
    if meta.ood is None:
        return None
    before = meta.ood.threshold
    scores = {k: _ood_distances(v, before) for k, v in by_precision.items()}
    chosen = {k: choose_ood_threshold(v) for k, v in scores.items()}
    threshold = max(before, *chosen.values())
    metrics: dict[str, object] = {
        "ood_threshold_by_precision": chosen,
        "val_flagged_ood": max(float((v > threshold).mean()) for v in scores.values()),
    }
    if ood_dev:
        metrics["ood_dev_flagged"] = min(float((_ood_distances(v, before) > threshold).mean()) for v in ood_dev.values())
    # Without foreign images to measure, a catch rate from before a raised threshold would overstate.
    stale = ("ood_dev_flagged",) if threshold > before and not ood_dev else ()
    record_thresholds(bundle_dir, metrics, ood=threshold, forget=stale)
    log.info("out-of-distribution threshold %.2f (was %.2f): the strictest flagging at most 5%% of the application's "
             "%s predictions on validation", threshold, before, " and ".join(chosen))
    return threshold


def _unfamiliar(predictions: Sequence[Prediction], scored_at: float | None, threshold: float | None) -> np.ndarray:
    """Which predictions the chosen out-of-distribution check flags (none without a check)."""
    if scored_at is None or threshold is None:
        return np.zeros(len(predictions), bool)
    return _ood_distances(predictions, scored_at) > threshold


def _ood_distances(predictions: Sequence[Prediction], threshold: float) -> np.ndarray:
    """The Mahalanobis distances behind the predictions' scores (distance / threshold at the time)."""
    if any(p.ood_score is None for p in predictions):
        raise ValueError("predictions without an out-of-distribution score: run them with the bundle's check")
    return np.array([p.ood_score for p in predictions], dtype=np.float64) * threshold
