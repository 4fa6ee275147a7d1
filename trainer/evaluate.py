"""`bcc-train evaluate`: judge a bundle the way the application will run it.

Predictions come from the application's own `Classifier` (same reader, input policy,
temperature and flags), so the figures describe what a lab will get, not a training-time proxy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bcc_desk.bundle import load_bundle
from bcc_desk.classifier import Classifier
from trainer.split import Split, list_dataset


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    markdown: str
    folder: Path


def evaluate(
    bundle_dir: Path,
    data: Path,
    split: Path | None = None,
    part: str = "test",
    out: Path | None = None,
    device: str = "auto",
    tta: bool = False,
) -> EvalResult:
    from trainer.metrics import classification_report, expected_calibration_error, study_table
    from trainer.plots import plot_confusion, plot_reliability

    data = Path(data).resolve()
    bundle = load_bundle(bundle_dir)
    classes = bundle.classes
    if split is not None:
        s = Split.load(Path(split), data)
        if part not in ("train", "val", "test"):
            raise ValueError(f"--part must be train, val or test, not {part!r}")
        items = list(zip(s.paths(part), (s.classes[i] for i in s.labels(part))))
    else:
        items = list_dataset(data)
        part = "all"
    unknown = sorted({c for _, c in items} - set(classes))
    if unknown:
        raise ValueError(f"the data has classes the model does not know: {', '.join(unknown)}")
    if not items:
        raise ValueError(f"no images to evaluate in {data} ({part})")

    clf = Classifier(bundle, device=device, tta=tta)
    preds = list(clf.predict_paths([data / p for p, _ in items], data))
    errors = [p for p in preds if not p.ok]
    if errors:
        raise ValueError(f"{len(errors)} images could not be read (first: {errors[0].file}: {errors[0].error})")
    y = np.array([classes.index(c) for _, c in items])
    probs = np.array([[p.probabilities[c] for c in clf.classes] for p in preds])  # keyed by display name
    y_pred = probs.argmax(1)
    report = classification_report(y, y_pred, clf.classes)
    flagged = np.array([p.needs_review for p in preds])
    correct = y_pred == y
    report.update(
        {
            "part": part,
            "model": bundle.name,
            "model_sha256": bundle.sha256,
            "tta": tta,
            "device": clf.device_label,  # the numerics the figures were made with (int8 on x86 CPUs)
            "ece": float(expected_calibration_error(probs, y)),
            "flagged": float(flagged.mean()),
            "accuracy_unflagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
            "errors_flagged": float(flagged[~correct].mean()) if (~correct).any() else None,
            "flagged_unfamiliar": float(np.mean(["unlike" in p.review_reason for p in preds])),
        }
    )
    folder = Path(out) if out else Path(bundle_dir).resolve().parent / f"eval-{part}"
    folder.mkdir(parents=True, exist_ok=True)
    plot_confusion(np.array(report["confusion_matrix"]), clf.classes, folder / "confusion.png")
    plot_reliability(probs, y, folder / "reliability.png")
    markdown = "\n".join(
        [
            f"**{bundle.name}** on the {part} images of `{data.name}` ({len(items)} images{', 8-view TTA' if tta else ''}; "
            f"{clf.device_label})",
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
        f"{part}_macro_f1": report["macro_f1"],
        f"{part}_recall": {c: m["recall"] for c, m in per_class.items()},
        f"{part}_f1": {c: m["f1"] for c, m in per_class.items()},
        f"{part}_ece": report["ece"],
        f"{part}_flagged": report["flagged"],
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
