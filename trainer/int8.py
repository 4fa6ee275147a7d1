"""Give a bundle static int8 inference: calibration images from its validation split, then a
check of int8 against fp32 on the whole validation split through the application's own
Classifier.  The application picks int8 by itself only for bundles that passed the check.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from bcc_desk.bundle import clear_int8_calibration, read_meta, save_int8_calibration
from bcc_desk.classifier import Prediction
from bcc_desk.images import open_image
from bcc_desk.preprocess import make_transform
from trainer.review_threshold import app_predictions, choose_thresholds, ood_predictions, validation_truth
from trainer.split import Split

log = logging.getLogger("bcc-train")

CALIBRATION_IMAGES = 64
"""64 measured as good as more: 32 flipped one label more on the shipped model's validation."""
MIN_LABEL_AGREEMENT = 0.98
MIN_OOD_AGREEMENT = 0.98
SPARE_IMAGES = 1
"""However small validation is, this many images may differ: on a lab's 40 images one image at
a boundary is 2.5%, and refused int8 over it (#37).  The review and OOD thresholds are chosen
on both numerics, so the promise holds for int8 either way."""


class Int8CheckFailed(ValueError):
    """int8 strays too far from fp32 on validation; the bundle was left without int8."""


def add_int8(
    bundle_dir: Path, data: Path, split_csv: Path, images: int = CALIBRATION_IMAGES, seed: int = 0, workers: int = 2,
    ood_dir: Path | None = None,
) -> dict[str, Any]:
    """Store calibration images in the bundle, check int8 on the validation split and choose the
    review and out-of-distribution thresholds on both numerics (`review_threshold`; `ood_dir`:
    foreign images to measure the chosen check on); return the check (also recorded in
    bundle.json).  Raises Int8CheckFailed, BundleError, ValueError."""
    bundle_dir, data = Path(bundle_dir), Path(data)
    split = Split.load(Path(split_csv), data)
    meta = read_meta(bundle_dir)
    trained_on = meta.provenance.get("split_sha256")
    if trained_on and trained_on != split.sha256():
        raise ValueError(
            f"{split_csv} is not the split {bundle_dir} was trained with: its validation images may be training images"
        )
    val = [data / p for p in split.paths("val")]
    if not val:
        raise ValueError(f"{split_csv} has no validation images")
    chosen = random.Random(seed).sample(val, min(images, len(val)))
    spec = meta.input
    transform = make_transform(spec)
    calibration = torch.stack([transform(open_image(p, reduce_to=round(spec.size / spec.crop_pct))) for p in chosen])

    # Written unchecked first (the check runs the real int8 path, which reads it from the
    # bundle); 'auto' ignores a calibration whose check has not passed.
    save_int8_calibration(bundle_dir, calibration, {"passed": False})
    try:
        reference = app_predictions(bundle_dir, val, data, "fp32", workers)
        quantized = app_predictions(bundle_dir, val, data, "int8", workers)
    except BaseException:
        clear_int8_calibration(bundle_dir)
        raise
    check = compare_int8(reference, quantized)
    check["calibration_images"] = len(chosen)
    check["passed"] = _agrees(check["label_agreement"], MIN_LABEL_AGREEMENT, check["images"]) and \
        _agrees(check["ood_agreement"], MIN_OOD_AGREEMENT, check["images"])
    if not check["passed"]:
        clear_int8_calibration(bundle_dir)
        raise Int8CheckFailed(
            f"int8 agrees with fp32 on {check['label_agreement']:.1%} of labels and {check['ood_agreement']:.1%} "
            f"of out-of-distribution flags on validation (needed {MIN_LABEL_AGREEMENT:.0%} and "
            f"{MIN_OOD_AGREEMENT:.0%}, or at most {SPARE_IMAGES} image apart): the bundle stays without int8"
        )
    save_int8_calibration(bundle_dir, calibration, check)
    # Labs on x86 CPUs now get int8: the review promise must hold for its numerics too.
    choose_thresholds(bundle_dir, validation_truth(split, meta), {"fp32": reference, "int8": quantized},
                      ood_predictions(bundle_dir, ood_dir, ("fp32", "int8"), workers), split.groups("val"))
    return check


def compare_int8(reference: list[Prediction], quantized: list[Prediction]) -> dict[str, Any]:
    """How int8 predictions differ from fp32 ones of the same images."""
    n = len(reference)
    flips = [i for i in range(n) if reference[i].label != quantized[i].label]
    confidence = [abs((reference[i].confidence or 0.0) - (quantized[i].confidence or 0.0)) for i in range(n)]
    return {
        "images": n,
        "label_agreement": 1 - len(flips) / n,
        "changed_labels_all_flagged": all(reference[i].needs_review and quantized[i].needs_review for i in flips),
        "review_agreement": sum(r.needs_review == q.needs_review for r, q in zip(reference, quantized)) / n,
        "ood_agreement": sum(_unfamiliar(r) == _unfamiliar(q) for r, q in zip(reference, quantized)) / n,
        "max_confidence_change": max(confidence),
        "median_confidence_change": sorted(confidence)[n // 2],
    }


def _agrees(agreement: float, floor: float, n: int) -> bool:
    """At least `floor` of `n` images agree, or no more than `SPARE_IMAGES` differ."""
    differ = round((1 - agreement) * n)
    return agreement >= floor or differ <= SPARE_IMAGES


def _unfamiliar(p: Prediction) -> bool:
    return p.ood_score is not None and p.ood_score > 1.0


def finish_for_app(
    bundle_dir: Path, data: Path, split_csv: Path, split: Split, workers: int = 2, ood_dir: Path | None = None,
    int8: bool = True,
) -> bool:
    """Settle a new bundle's thresholds on the application's numerics: with int8 where this CPU
    and the check allow (it is a speed-up for CPU users: a bundle that cannot have it is still
    good), else on fp32 alone.  Returns whether int8 was added."""
    from bcc_desk.bundle import BundleError
    from bcc_desk.quantize import int8_unavailable_reason
    from trainer.review_threshold import choose_thresholds_on_fp32

    if int8:
        if reason := int8_unavailable_reason(torch.device("cpu")):
            log.info("no int8 added (%s)", reason)
        else:
            try:
                check = add_int8(bundle_dir, data, split_csv, workers=workers, ood_dir=ood_dir)
            except (ValueError, BundleError) as exc:
                log.warning("no int8 added: %s", exc)
            else:
                log.info("int8 added: %.1f%% of validation labels as fp32", 100 * check["label_agreement"])
                return True
    choose_thresholds_on_fp32(bundle_dir, data, split, workers=workers, ood_dir=ood_dir)
    return False
