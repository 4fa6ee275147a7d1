"""`bcc-train evaluate`: judge a bundle the way the application will run it.

Predictions come from the application's own `Classifier` (same reader, input policy,
temperature and flags), so the figures describe what a lab will get, not a training-time proxy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bcc_desk.bundle import Bundle, load_bundle
from bcc_desk.classifier import Classifier, Prediction  # the trainer reaches the app through the engine
from trainer.dataset import list_dataset
from trainer.split import Split


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    markdown: str
    folder: Path


@dataclass(frozen=True)
class Judged:
    """The labelled images a bundle is judged on, and how the classifier runs on them."""

    data: Path
    split: Path | None = None
    """RUN/split.csv: judge on its `part`; None: every image in `data`."""
    part: str = "test"
    device: str = "auto"
    tta: bool = False


@dataclass
class Classified:
    """A bundle's predictions on one set of labelled images, as the application makes them."""

    bundle: Bundle
    data: Path
    """The data folder, resolved; `items` paths are relative to it."""
    part: str
    """train, val or test of a split, or "all" (every image in `data`)."""
    items: list[tuple[str, str]]
    """(relative posix path, true class folder) per image, in prediction order."""
    classes: list[str]
    """The model's display names, in output order (`Classifier.classes`)."""
    device: str
    """The numerics the predictions were made with (`Classifier.device_label`)."""
    tta: bool
    predictions: list[Prediction]
    y: np.ndarray
    """True class index (into `classes`) per image."""
    probs: np.ndarray
    """(images, classes) calibrated probabilities, columns in `classes` order."""


def classify_items(bundle: Bundle | Path, on: Judged) -> Classified:
    """Run a bundle through the application's `Classifier` on one part of a split (or on every
    image of `data` when `split` is None).  Any problem is a one-line `ValueError` (`BundleError`
    for a bad bundle): unknown classes, no images, unreadable images."""
    data, split, part, tta = Path(on.data).resolve(), on.split, on.part, on.tta
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if split is not None:
        s = Split.load(Path(split), data)
        if part not in ("train", "val", "test"):
            raise ValueError(f"--part must be train, val or test, not {part!r}")
        items = list(zip(s.paths(part), (s.classes[i] for i in s.labels(part))))
        groups: list[int] | None = s.groups(part)
    else:
        items = list_dataset(data)
        part = "all"
        groups = None
    # A lab's data folder may name a class as the model shows it ("early Pre-B").
    index = {c: bundle.meta.class_index(c) for c in {c for _, c in items}}
    unknown = sorted(c for c, i in index.items() if i is None)
    if unknown:
        raise ValueError(f"the data has classes the model does not know: {', '.join(unknown)}")
    if not items:
        raise ValueError(f"no images to evaluate in {data} ({part})")

    clf = Classifier(bundle, device=on.device, tta=tta)
    preds = list(clf.predict_paths([data / p for p, _ in items], data))
    # The review flags as a lab gets them from slides.  The folders here are the true classes, so
    # they must not act as slides (their consensus would know the answer): the split's groups
    # stand in for slides; without a split each image is judged alone.
    slides = [f"group {g}" for g in groups] if groups is not None else [p.file for p in preds]
    preds = clf.review_policy.apply([replace(p, slide=s) for p, s in zip(preds, slides, strict=True)])
    errors = [p for p in preds if not p.ok]
    if errors:
        raise ValueError(f"{len(errors)} images could not be read (first: {errors[0].file}: {errors[0].error})")
    y = np.array([index[c] for _, c in items])
    probs = np.array([[p.probabilities[c] for c in clf.classes] for p in preds])  # keyed by display name
    return Classified(bundle, data, part, items, list(clf.classes), clf.device_label, tta, preds, y, probs)


def score(c: Classified) -> dict[str, Any]:
    """metrics.json's figures: `classification_report` plus calibration and the review flags."""
    from trainer.metrics import classification_report, expected_calibration_error

    y, probs, preds = c.y, c.probs, c.predictions
    y_pred = probs.argmax(1)
    report = classification_report(y, y_pred, c.classes)
    flagged = np.array([p.needs_review for p in preds])
    correct = y_pred == y
    report.update(
        {
            "part": c.part,
            "model": c.bundle.name,
            "model_sha256": c.bundle.sha256,
            "tta": c.tta,
            "device": c.device,  # the numerics the figures were made with (int8 on x86 CPUs)
            "ece": float(expected_calibration_error(probs, y)),
            "flagged": float(flagged.mean()),
            "accuracy_unflagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
            "errors_flagged": float(flagged[~correct].mean()) if (~correct).any() else None,
            "flagged_unfamiliar": float(np.mean(["unlike" in p.review_reason for p in preds])),
        }
    )
    return report


def evaluate(bundle_dir: Path, on: Judged, out: Path | None = None) -> EvalResult:
    from trainer.metrics import study_table
    from trainer.plots import plot_confusion, plot_reliability

    c = classify_items(bundle_dir, on)
    bundle, data, part, items, probs, y = c.bundle, c.data, c.part, c.items, c.probs, c.y
    report = score(c)
    folder = Path(out) if out else Path(bundle_dir).resolve().parent / f"eval-{part}"
    folder.mkdir(parents=True, exist_ok=True)
    plot_confusion(np.array(report["confusion_matrix"]), c.classes, folder / "confusion.png")
    plot_reliability(probs, y, folder / "reliability.png")
    markdown = "\n".join(
        [
            f"**{bundle.name}** on the {part} images of `{data.name}` ({len(items)} images{', 8-view TTA' if c.tta else ''}; "
            f"{c.device})",
            "",
            study_table(report),
            "",
            f"Expected calibration error {report['ece']:.3f}; flagged for review {report['flagged']:.1%} "
            f"(accuracy of the rest {_pct(report['accuracy_unflagged'])}, share of errors flagged "
            f"{_pct(report['errors_flagged'])}).",
        ]
    )
    (folder / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "metrics.md").write_text(markdown + "\n", encoding="utf-8")
    return EvalResult(report, markdown, folder)


def summary_metrics(report: dict) -> dict[str, object]:
    """The figures a lab looks for first, as `bcc info` shows them: '<part>_accuracy', ...,
    '<part>_recall' and '<part>_f1' per class."""
    part = report["part"]
    per_class = report["per_class"]
    return {
        f"{part}_images": report["n"],
        f"{part}_accuracy": report["accuracy"],
        f"{part}_accuracy_ci": report["accuracy_ci"],
        f"{part}_macro_f1": report["macro_f1"],
        f"{part}_macro_f1_ci": report["macro_f1_ci"],
        f"{part}_per_class": {c: m["support"] for c, m in per_class.items()},
        f"{part}_recall": {c: m["recall"] for c, m in per_class.items()},
        f"{part}_recall_ci": {c: m["recall_ci"] for c, m in per_class.items()},
        f"{part}_f1": {c: m["f1"] for c, m in per_class.items()},
        f"{part}_f1_ci": {c: m["f1_ci"] for c, m in per_class.items()},
        f"{part}_ece": report["ece"],
        f"{part}_flagged": report["flagged"],
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
