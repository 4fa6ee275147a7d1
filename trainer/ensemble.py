"""`bcc-train ensemble`: several trained bundles packed into one model bundle.

Networks trained apart make different mistakes, so the average of their calibrated probabilities
is sure of fewer wrong answers than any one of them (Lakshminarayanan et al. 2017): what the
review rule's promise rests on.  `bcc classify -m A -m B` runs bundles as an ensemble too, but
flags with the strictest of their own thresholds, each chosen for one network alone.  Packed into
one bundle the ensemble gets its own temperature and its own review and out-of-distribution
thresholds, chosen on validation the way `fit` chooses a single network's and then chosen on the
application's numerics, and it runs wherever a bundle does: one name, one sha256, int8.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bcc_desk.bundle import (
    Bundle,
    BundleMeta,
    OODSpec,
    build_model,
    load_bundle,
    read_meta,
    record_thresholds,
    save_bundle,
)
from trainer.colour_check import add_colour_check
from trainer.int8 import finish_for_app
from trainer.metrics import (
    choose_ood_threshold,
    choose_review_threshold,
    classification_report,
    expected_calibration_error,
    fit_temperature,
)
from trainer.review_threshold import app_predictions, validation_truth
from trainer.split import Split
from trainer.verdict import judge_bundle

log = logging.getLogger("bcc-train")


def build_ensemble(
    members: Sequence[Path], out: Path, data: Path, split_csv: Path, name: str | None = None,
    ood_dir: Path | None = None, int8: bool = True, workers: int = 2,
) -> Path:
    """Pack the bundles `members` (one architecture, head, input and class list, all trained on
    the split `split_csv` of `data`) into a new bundle in `out`, calibrate it and choose its
    thresholds on the split's validation images.  Returns `out`.  A problem is a one-line
    ValueError (or BundleError) before anything is written."""
    out, data = Path(out), Path(data)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty folder: choose a new one for the ensemble")
    if len(members) < 2:
        raise ValueError("an ensemble needs two or more bundles")
    split = Split.load(Path(split_csv), data)
    bundles = [load_bundle(m) for m in members]
    _check_members(bundles, split, Path(split_csv))
    first = bundles[0].meta
    colour = any(b.meta.colour is not None for b in bundles)
    # The images are decoded once, at the largest member's size; the others see them resized.
    size = max(b.meta.input.size for b in bundles)

    meta = BundleMeta(
        name=name or "+".join(b.name for b in bundles),
        arch=first.arch, classes=list(first.classes), input=replace(first.input, size=size), head=first.head,
        display_names=list(first.display_names),
        ood=OODSpec(threshold=1.0, features=first.ood.features) if first.ood else None,  # chosen below
        members=[{"name": b.name, "weights_sha256": b.sha256, "temperature": b.meta.temperature,
                  **({"size": b.meta.input.size} if b.meta.input.size != size else {})} for b in bundles],
        provenance={
            "data_fingerprint": first.provenance.get("data_fingerprint"),
            "split_sha256": split.sha256(),
            "split_counts": first.provenance.get("split_counts"),
            "init": "ensemble of " + ", ".join(b.name for b in bundles),
            "members": [{"name": b.name, "sha256": b.sha256, **_summary(b.meta)} for b in bundles],
        },
    )
    state = {f"members.{i}.{k}": v for i, b in enumerate(bundles) for k, v in b.model.state_dict().items()
             if not k.startswith("ood_")}
    if first.ood is not None:
        # Block-diagonal: the distance to a class is the sum of the members' distances to it.
        state["ood_means"] = torch.cat([b.model.ood_means for b in bundles], dim=1)
        state["ood_precision"] = torch.block_diag(*(b.model.ood_precision for b in bundles))
    model = build_model(meta)
    model.load_state_dict(state, strict=True)
    save_bundle(model, meta, out, dtype=getattr(torch, first.weights_dtype))
    del model, state, bundles
    try:
        _calibrate(out, data, split, workers)
        finish_for_app(out, data, Path(split_csv), split, workers=workers, ood_dir=ood_dir, int8=int8)
        if colour:  # profiled again at the ensemble's input size, its cut-off chosen for the ensemble
            add_colour_check(out, data, Path(split_csv), workers=workers)
        judge_bundle(out, split)
    except BaseException:
        # Half a bundle (placeholder thresholds) must not be mistaken for a model.
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
        raise
    return out


def _check_members(bundles: Sequence[Bundle], split: Split, split_csv: Path) -> None:
    """Refuse members that cannot be averaged, or whose training saw the validation images that
    will tune the ensemble."""
    ref = bundles[0]
    seen: dict[str, Path] = {}
    for b in bundles:
        if b.sha256 in seen:
            raise ValueError(f"{b.path} has the same weights as {seen[b.sha256]}: an ensemble needs different networks")
        seen[b.sha256] = b.path
        if b.meta.members:
            raise ValueError(f"{b.path} is an ensemble already: give its members instead")
        for what, mine, theirs in (
            ("architecture", b.meta.arch, ref.meta.arch), ("classes", b.meta.classes, ref.meta.classes),
            ("class names", b.meta.labels, ref.meta.labels),
            # the size may differ (EnsembleNet resizes), not how an image becomes the input
            ("input", replace(b.meta.input, size=0), replace(ref.meta.input, size=0)),
            ("head", b.meta.head, ref.meta.head),
            ("out-of-distribution check", b.meta.ood and b.meta.ood.features, ref.meta.ood and ref.meta.ood.features),
        ):
            if mine != theirs:
                raise ValueError(f"{b.path} and {ref.path} differ in their {what}: {mine} against {theirs}")
        if b.meta.provenance.get("split_sha256") != split.sha256():
            raise ValueError(f"{b.path} was not trained on the split {split_csv}: its validation images, which "
                             "tune the ensemble, may have been its training images")


def _summary(meta: BundleMeta) -> dict[str, object]:
    """What a member's provenance says about its training, for the ensemble's own."""
    keep = ("epochs", "seed", "init", "recipe", "device", "trained_at", "software")
    return {k: meta.provenance[k] for k in keep if k in meta.provenance}


def _calibrate(bundle_dir: Path, data: Path, split: Split, workers: int) -> None:
    """One fp32 pass of the ensemble over validation: its temperature (its outputs are
    log-probabilities, and an average of calibrated members is usually under-confident), then the
    review and out-of-distribution thresholds `fit` would choose, which the finishing steps refine."""
    meta = read_meta(bundle_dir)
    predictions = app_predictions(bundle_dir, [data / p for p in split.paths("val")], data, "fp32", workers)
    labels = meta.labels
    truth = np.array([labels.index(t) for t in validation_truth(split, meta)])
    mean = np.array([[p.probabilities[c] for c in labels] for p in predictions], dtype=np.float64)
    log_mean = np.log(np.clip(mean, 1e-30, None))
    temperature = fit_temperature(log_mean, truth)
    probs = torch.softmax(torch.as_tensor(log_mean) / temperature, dim=1).numpy()
    right = probs.argmax(1) == truth
    review = choose_review_threshold(probs.max(1), right)
    report = classification_report(truth, probs.argmax(1), labels)
    metrics: dict[str, object] = {
        "val_accuracy": report["accuracy"],
        "val_macro_f1": report["macro_f1"],
        "val_ece_before": expected_calibration_error(mean, truth),
        "val_ece_after": expected_calibration_error(probs, truth),
        "val_flagged_low_confidence": float((probs.max(1) < review).mean()),
    }
    ood = None
    if meta.ood is not None:  # scored against the placeholder threshold 1: the scores are the distances
        distances = np.array([p.ood_score for p in predictions], dtype=np.float64)
        ood = choose_ood_threshold(distances)
        metrics["val_flagged_ood"] = float((distances > ood).mean())
    record_thresholds(bundle_dir, metrics, review=review, ood=ood, temperature=temperature)
    log.info("ensemble calibrated on %d validation images: accuracy %.1f%%, T=%.3f, review < %.3f",
             len(truth), 100 * report["accuracy"], temperature, review)
