"""The colour check's profile and cut-off, and the shift benchmark they are chosen with.

`fit` profiles the training images' colours (`bcc_desk.colour`) and starts the cut-off where 1%
of its validation images fall beyond it.  Then the validation images are classified again under
every shift of `trainer.shifts` through the application's own classifier, and the cut-off is
lowered until, under each shift, the images no reason flags are at least 99% right with one
error to spare (none wrong always passes): the check then flags what the network cannot handle
and leaves alone what it can.  It never flags more than `MAX_FLAGGED` of unshifted validation;
where that is not enough the bundle records which shifts break the promise and `fit` says so.
The table of every shift goes into the bundle's metrics (`shift`), for `bcc info` and the README.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bcc_desk.bundle import load_bundle, read_meta, record_colour_profile, record_thresholds
from bcc_desk.classifier import Classifier, Prediction
from bcc_desk.colour import FEATURES, ColourSpec, colour_features, fit_colour_profile
from bcc_desk.images import open_image
from bcc_desk.prediction import REVIEW_COLOUR
from trainer.shifts import SHIFTS, Shift

log = logging.getLogger("bcc-train")

START_FLAGGED = 0.01
"""The cut-off starts where this share of unshifted validation lies beyond it."""
MAX_FLAGGED = 0.05
"""The most of unshifted validation the colour check may flag, however the shifts go."""
TARGET = 0.99
"""Under every shift, the unflagged images at least this share right (issue #35)."""


def image_features(images: torch.Tensor) -> np.ndarray:
    """(n, 3, h, w) uint8 at the network's input -> (n, d) colour statistics, as the
    application's classifier computes them on each image it decodes."""
    return np.stack([colour_features(img.numpy()) for img in images.cpu()]) if len(images) else np.empty((0, len(FEATURES)))


def fit_colour_check(train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                     n_classes: int) -> ColourSpec:
    """The training colour profile with the starting cut-off (`START_FLAGGED` of validation)."""
    spec = fit_colour_profile(image_features(train_images), train_labels.cpu().numpy(), n_classes)
    distances = spec.distances(image_features(val_images)) if len(val_images) else spec.distances(image_features(train_images))
    return replace(spec, threshold=float(max(np.quantile(distances, 1 - START_FLAGGED), 1e-6)))


def shifted_predictions(
    bundle_dir: Path | Sequence[Path], paths: Sequence[Path], root: Path, shifts: Sequence[Shift] = SHIFTS,
    precision: str = "fp32", workers: int = 2, **classifier_options: Any,
) -> dict[str, list[Prediction]]:
    """The application's predictions on `paths` (under `root`) under each shift, by one
    classifier: each image as another lab's stain, lamp, camera or objective would give it,
    written losslessly to a temporary folder laid out like `root` (so slides stay slides)."""
    dirs = [bundle_dir] if isinstance(bundle_dir, (str, Path)) else list(bundle_dir)
    clf = Classifier([load_bundle(d) for d in dirs], device="cpu", precision=precision, workers=workers,
                     compile=None if precision == "int8" else False, **classifier_options)
    originals = [open_image(p) for p in paths]
    out: dict[str, list[Prediction]] = {}
    with tempfile.TemporaryDirectory(prefix="bcc-shift-") as tmp:
        for shift in shifts:
            folder = Path(tmp) / "shifted"
            targets = []
            for path, image in zip(paths, originals, strict=True):
                target = (folder / Path(path).relative_to(root)).with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                shift.apply(image).save(target, compress_level=1)
                targets.append(target)
            predictions = list(clf.predict_paths(targets, folder))
            bad = [p for p in predictions if not p.ok]
            if bad:
                raise ValueError(f"{bad[0].path}: {bad[0].error}")
            out[shift.name] = [replace(p, path=src, file=Path(src).relative_to(root).as_posix())
                               for p, src in zip(predictions, paths, strict=True)]
            for t in targets:
                t.unlink()
    return out


def shift_row(predictions: Sequence[Prediction], truth: Sequence[str]) -> dict[str, float | int]:
    """One shift's line of the table: accuracy, share flagged, the unflagged images' accuracy
    and errors, and the share the colour check flags."""
    right = np.array([p.label == t for p, t in zip(predictions, truth, strict=True)])
    flagged = np.array([p.needs_review for p in predictions])
    colour = np.array([p.colour_score is not None and p.colour_score > 1 for p in predictions])
    kept = ~flagged
    return {
        "images": len(right), "accuracy": float(right.mean()), "flagged": float(flagged.mean()),
        "unflagged_accuracy": float(right[kept].mean()) if kept.any() else 1.0,
        "unflagged_errors": int((~right & kept).sum()), "colour_flagged": float(colour.mean()),
    }


def promise_holds(right: np.ndarray, kept: np.ndarray) -> bool:
    """The unflagged images at least `TARGET` right with one error to spare; none wrong passes."""
    errors, n = int((~right & kept).sum()), int(kept.sum())
    return errors == 0 or errors + 1 <= (1 - TARGET) * n


def choose_colour_threshold(
    distances: Mapping[str, np.ndarray], right: Mapping[str, np.ndarray], flagged_otherwise: Mapping[str, np.ndarray],
    start: float, unshifted: str = "none",
) -> tuple[float, list[str]]:
    """The largest cut-off, at most `start`, under which every shift keeps the promise
    (`promise_holds`), but never one flagging more than `MAX_FLAGGED` of unshifted validation.
    Returns it and the shifts that still break the promise there (none: the check is enough)."""
    floor = float(np.quantile(distances[unshifted], 1 - MAX_FLAGGED))
    candidates = sorted({start, *(float(d) for v in distances.values() for d in v if floor <= d < start)}, reverse=True)

    def broken(t: float) -> list[str]:
        return [k for k in distances if not promise_holds(right[k], ~(flagged_otherwise[k] | (distances[k] > t)))]

    for t in candidates:
        # Just below an image's distance flags it: the next candidate down is that image's.
        if not broken(t):
            return t, []
    t = min(candidates) if candidates else start
    return t, broken(t)


def choose_colour_cutoff(
    bundle_dir: Path, paths: Sequence[Path], root: Path, truth: Sequence[str], precision: str = "fp32", workers: int = 2,
) -> dict[str, dict[str, float | int]]:
    """Classify validation under every shift, choose the colour check's cut-off
    (`choose_colour_threshold`), write it and the shift table (with that cut-off) into the
    bundle, and return the table."""
    meta = read_meta(bundle_dir)
    if meta.colour is None:
        raise ValueError(f"{bundle_dir} has no colour profile to choose a cut-off for")
    by_shift = shifted_predictions(bundle_dir, paths, root, precision=precision, workers=workers)
    before = meta.colour.threshold
    distances = {k: np.array([p.colour_score for p in v], dtype=np.float64) * before for k, v in by_shift.items()}
    right = {k: np.array([p.label == t for p, t in zip(v, truth, strict=True)]) for k, v in by_shift.items()}
    # What flags an image besides the colour check: low confidence, unfamiliar features.
    otherwise = {k: np.array([bool(_other_reasons(p)) for p in v]) for k, v in by_shift.items()}
    threshold, broken = choose_colour_threshold(distances, right, otherwise, before)
    table = {k: shift_row([_with_colour(p, d / threshold) for p, d in zip(v, distances[k], strict=True)], truth)
             for k, v in by_shift.items()}
    flagged = float((distances["none"] > threshold).mean())
    metrics: dict[str, object] = {"shift": table, "shift_precision": precision, "val_flagged_colour": flagged}
    if broken:
        metrics["shift_promise_broken"] = broken
        log.warning("the colour check cannot keep the review promise under %s without flagging more than %.0f%% of "
                    "validation: this model is not safe under those shifts", ", ".join(broken), 100 * MAX_FLAGGED)
    record_thresholds(bundle_dir, metrics, colour=threshold)
    log.info("colour check cut-off %.3f (was %.3f): %.1f%% of validation flagged; under every shift the unflagged "
             "images are %.1f%% right at worst", threshold, before, 100 * flagged,
             100 * min(r["unflagged_accuracy"] for r in table.values()))
    return table


def _other_reasons(p: Prediction) -> list[str]:
    return [r for r in p.review_reason.split("; ") if r and r != REVIEW_COLOUR]


def _with_colour(p: Prediction, ratio: float) -> Prediction:
    """`p` as the colour check at another cut-off would flag it."""
    reasons = _other_reasons(p) + ([REVIEW_COLOUR] if ratio > 1 else [])
    return replace(p, colour_score=ratio, needs_review=bool(reasons), review_reason="; ".join(reasons))


def add_colour_check(bundle_dir: Path, data: Path, split_csv: Path, workers: int = 2) -> dict[str, dict[str, float | int]]:
    """`bcc-train colour-check`: profile the colours of the training images of `split_csv` (the
    bundle's own split), choose the cut-off on its validation images under every shift, in the
    numerics the application runs here; returns the shift table."""
    from bcc_desk.classifier import int8_checked
    from bcc_desk.quantize import int8_unavailable_reason
    from trainer.data import decode_images
    from trainer.review_threshold import validation_truth
    from trainer.split import Split

    bundle_dir, data = Path(bundle_dir), Path(data)
    split = Split.load(Path(split_csv), data)
    meta = read_meta(bundle_dir)
    trained_on = meta.provenance.get("split_sha256")
    if trained_on and trained_on != split.sha256():
        raise ValueError(f"{split_csv} is not the split {bundle_dir} was trained with: its validation images may be training images")
    if not split.paths("val"):
        raise ValueError(f"{split_csv} has no validation images")
    indices = [meta.class_index(split.classes[i]) for i in split.labels("train")]
    labels = [i for i in indices if i is not None]
    if len(labels) != len(indices):
        raise ValueError(f"the split has a class {bundle_dir} does not know")
    train = decode_images(data, split.paths("train"), labels, meta.input, workers)
    val = decode_images(data, split.paths("val"), [0] * len(split.paths("val")), meta.input, workers)
    record_colour_profile(bundle_dir, fit_colour_check(train.images, train.labels, val.images, len(meta.classes)))
    bundle = load_bundle(bundle_dir, build=False)
    int8 = int8_checked(bundle) and int8_unavailable_reason(torch.device("cpu")) is None
    return choose_colour_cutoff(bundle_dir, [data / p for p in split.paths("val")], data, validation_truth(split, meta),
                               precision="int8" if int8 else "fp32", workers=workers)
