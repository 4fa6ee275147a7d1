"""`bcc-train compare`: two bundles on the same images, side by side, before a lab switches models.

Both bundles run through the application's own `Classifier` (via `trainer.evaluate.classify_items`),
so every count here is what `bcc classify` would report with each bundle.  Besides the per-class
figures, the comparison is *paired*: the same images are scored by both models, so whether one is
really more accurate is judged with McNemar's exact test on the images where exactly one is right,
which is far more sensitive than comparing two accuracies as if they came from different images.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bcc_desk.bundle import Bundle, load_bundle
from bcc_desk.files import write_text_atomic
from bcc_desk.stats import wilson_interval
from trainer.evaluate import Classified, Judged, classify_items, score
from trainer.metrics import pct as _pct, pct_ci  # the study table's percentages

MD_ROWS = 50  # rows of the image lists in compare.md; compare.json always holds them all


@dataclass
class CompareResult:
    report: dict[str, Any]
    markdown: str
    folder: Path


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """McNemar's exact test: the two-sided binomial p-value of the discordant pairs (images where
    exactly one model is right) splitting `only_a` : `only_b` if each were equally likely.

    Images both models get right (or both wrong) say nothing about which is better, so only the
    discordant ones count; no discordant image at all is no evidence of a difference (p = 1)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must not be negative, got {only_a} and {only_b}")
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def check_same_classes(a: Bundle, b: Bundle) -> bool:
    """Raise a one-line `ValueError` unless both bundles know the same classes, each folder under
    the same display name.  Returns whether B lists them in another order (then B's columns are
    aligned to A's by name: the order is an accident of training, the names are what a lab reads)."""
    pairs_a, pairs_b = list(zip(a.classes, a.labels)), list(zip(b.classes, b.labels))
    if sorted(pairs_a) == sorted(pairs_b):
        return pairs_a != pairs_b
    if sorted(a.labels) != sorted(b.labels):
        shown_a, shown_b = a.labels, b.labels
    else:  # same names, but given to different class folders: show the folders
        shown_a, shown_b = [f"{c} = {n}" for c, n in pairs_a], [f"{c} = {n}" for c, n in pairs_b]
    raise ValueError(
        f"the two models have different classes: {a.name} has {shown_a}, {b.name} has {shown_b}"
    )


def compare(bundle_a: Path, bundle_b: Path, on: Judged, out: Path | None = None) -> CompareResult:
    """Classify the same images with both bundles and write `compare.md` and `compare.json` into
    `out` (default `./compare-<A>-vs-<B>`).  Problems are one-line `ValueError`s / `BundleError`s."""
    a, b = load_bundle(bundle_a), load_bundle(bundle_b)
    reordered = check_same_classes(a, b)  # before minutes of classifying, not after
    ca, cb = classify_items(a, on), classify_items(b, on)
    if cb.items != ca.items:  # the same listing twice; a folder changing meanwhile would pair wrong images
        raise ValueError(f"the images in {ca.data} changed while the two models ran; run the comparison again")
    if reordered:
        cb = _aligned(cb, ca.classes)
    report = _report(ca, cb, reordered)
    markdown = _markdown(report)
    folder = Path(out) if out else Path.cwd() / f"compare-{_slug(a.name)}-vs-{_slug(b.name)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "compare.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(folder / "compare.md", markdown + "\n")
    except OSError as exc:
        raise ValueError(f"cannot write the comparison to {folder}: {exc.strerror or exc}") from None
    return CompareResult(report, markdown, folder)


def _aligned(c: Classified, classes: list[str]) -> Classified:
    """`c` with its class order (probability columns, true-label indices) changed to `classes`."""
    order = [c.classes.index(name) for name in classes]
    new_index = {old: new for new, old in enumerate(order)}
    return Classified(
        c.bundle, c.data, c.part, c.items, list(classes), c.device, c.tta, c.predictions,
        np.array([new_index[int(i)] for i in c.y]), c.probs[:, order],
    )


def _model(c: Classified) -> dict[str, Any]:
    """One model's figures: evaluate's metrics plus the counts a `bcc classify` report shows."""
    figures = score(c)
    preds = c.predictions
    labels = Counter(p.label for p in preds)
    return {
        "name": c.bundle.name,
        "sha256": c.bundle.sha256,
        "device": c.device,
        "images": len(preds),
        "accuracy": figures["accuracy"],
        "accuracy_ci": figures["accuracy_ci"],
        "macro_f1": figures["macro_f1"],
        "macro_f1_ci": figures["macro_f1_ci"],
        "per_class": figures["per_class"],
        "confusion_matrix": figures["confusion_matrix"],
        "ece": figures["ece"],
        "flagged": figures["flagged"],
        "flagged_count": sum(p.needs_review for p in preds),  # the report's needs_review column
        "flagged_unfamiliar": figures["flagged_unfamiliar"],
        "flagged_unfamiliar_count": sum("unlike" in p.review_reason for p in preds),
        "accuracy_unflagged": figures["accuracy_unflagged"],
        "errors_flagged": figures["errors_flagged"],
        "label_counts": {name: labels[name] for name in c.classes},  # the report's label column
    }


def _report(ca: Classified, cb: Classified, reordered: bool) -> dict[str, Any]:
    classes = ca.classes
    true_names = [classes[i] for i in ca.y]
    right_a = np.array([p.label == t for p, t in zip(ca.predictions, true_names)])
    right_b = np.array([p.label == t for p, t in zip(cb.predictions, true_names)])
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    disagreements, flag_differs = [], []
    for k, (pa, pb) in enumerate(zip(ca.predictions, cb.predictions)):
        file, true = ca.items[k][0], true_names[k]
        if pa.label != pb.label:
            right = "A" if right_a[k] else "B" if right_b[k] else "neither"
            disagreements.append({
                "file": file, "true": true,
                "a": {"label": pa.label, "confidence": pa.confidence},
                "b": {"label": pb.label, "confidence": pb.confidence},
                "right": right,
            })
        if pa.needs_review != pb.needs_review:
            flag_differs.append({
                "file": file, "true": true,
                "a": {"label": pa.label, "needs_review": pa.needs_review, "review_reason": pa.review_reason},
                "b": {"label": pb.label, "needs_review": pb.needs_review, "review_reason": pb.review_reason},
            })
    models = {"a": _model(ca), "b": _model(cb)}
    n = len(ca.items)
    return {
        "data": str(ca.data),
        "part": ca.part,
        "tta": ca.tta,
        "images": n,
        "classes": classes,
        "b_classes_reordered": reordered,
        "models": models,
        "change": {  # B minus A: what switching to B does
            key: models["b"][key] - models["a"][key]
            for key in ("accuracy", "macro_f1", "ece", "flagged", "flagged_unfamiliar")
        },
        "paired": {
            "both_right": int((right_a & right_b).sum()),
            "only_a_right": only_a,
            "only_b_right": only_b,
            "both_wrong": int((~right_a & ~right_b).sum()),
            "mcnemar_p": mcnemar_exact_p(only_a, only_b),
        },
        "label_agreement": (n - len(disagreements)) / n,
        "disagreements": disagreements,
        "review_flag_differs": flag_differs,
    }


# -- compare.md -------------------------------------------------------------------------------------
def _cell(text: object) -> str:
    """Text from a file or model name made safe for a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _points(v: float) -> str:
    """A change of a share in signed percentage points ("+1.25 pts"), so 0 reads as no change."""
    return f"{100 * v:+.2f} pts"


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "model"


def _chance(p: float) -> str:
    """A p-value as "about N times in 100", the way a lab reads it."""
    if p >= 0.995:
        return "almost always"
    if p >= 0.01:
        return f"about {max(1, round(100 * p))} times in 100"
    if p >= 0.001:
        return f"about {round(1000 * p)} times in 1,000"
    return "less than once in 1,000"


def mcnemar_sentence(only_a: int, only_b: int, name_a: str, name_b: str) -> str:
    """McNemar's exact test and what its p-value means, in words a lab reads (Markdown)."""
    p = mcnemar_exact_p(only_a, only_b)
    if only_a + only_b == 0:
        return ("McNemar's exact test: p = 1. The two models are right and wrong on exactly the same images, "
                "so these images show no difference in accuracy.")
    text = f"McNemar's exact test on the {only_a + only_b} images where exactly one model is right ({only_a} : {only_b}): p = {p:.3g}."
    if only_a == only_b:
        return text + " Each model is right as often where the other is wrong: neither is more accurate on these images."
    text += (f" If the two models were equally accurate, a difference at least this large would arise by chance "
             f"{_chance(p)}.")
    if p < 0.05:
        better = name_a if only_a > only_b else name_b
        return text + f" That is unlikely to be chance: {_cell(better)} is the more accurate model on these images."
    return text + " That could well be chance: these images do not show that either model is more accurate."


MIN_DISCORDANT = 6
"""Fewer images where exactly one model is right can never reach p < 0.05 (all six one way: p = 0.031)."""


def too_few_to_tell(images: int, discordant: int) -> str:
    """Why these images cannot tell the models apart ('' when they can): a lab's few hundred
    images give intervals several points wide, and a handful of disagreements prove nothing."""
    lo, hi = wilson_interval(round(0.95 * images), images) if images else (0.0, 1.0)
    width = f"on {images} images the 95% interval of a 95% accuracy spans {100 * lo:.0f}-{100 * hi:.0f}%"
    if discordant < MIN_DISCORDANT:
        return (f"Only {discordant} images have exactly one model right: even all of them one way could not show a "
                f"difference (McNemar's test needs at least {MIN_DISCORDANT}); {width}.")
    if images < 200:
        return f"With {images} images, differences of a few points are within chance: {width}."
    return ""


def _too_few(images: int, discordant: int) -> list[str]:
    said = too_few_to_tell(images, discordant)
    return ["", f"**Too few images to tell.** {said}"] if said else []


def _image_rows(header: str, rows: list[str], total: int) -> list[str]:
    lines = [header, *rows[:MD_ROWS]]
    if total > MD_ROWS:
        lines += ["", f"{total - MD_ROWS} more in compare.json."]
    return lines


def _conf(entry: dict[str, Any]) -> str:
    return f"{_cell(entry['label'])} ({_pct(entry['confidence'])})"


def _markdown(report: dict[str, Any]) -> str:
    a, b = report["models"]["a"], report["models"]["b"]
    rows = [
        "| Class | Images | Metric | A (95% CI) | B (95% CI) | B − A |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name in report["classes"]:
        ma, mb = a["per_class"][name], b["per_class"][name]
        label, support = _cell(name), str(ma["support"])
        for metric, key in (("Precision", "precision"), ("Recall", "recall"), ("F1", "f1")):
            rows.append(f"| {label} | {support} | {metric} | {pct_ci(ma[key], ma.get(key + '_ci'))} | "
                        f"{pct_ci(mb[key], mb.get(key + '_ci'))} | {_points(mb[key] - ma[key])} |")
            label, support = "", ""
    n = str(report["images"])
    for metric, key in (("Accuracy", "accuracy"), ("Macro-F1", "macro_f1"),
                        ("Flagged for review", "flagged"), ("Flagged as unfamiliar", "flagged_unfamiliar")):
        rows.append(f"| **All classes** | {n} | {metric} | {pct_ci(a[key], a.get(key + '_ci'))} | "
                    f"{pct_ci(b[key], b.get(key + '_ci'))} | {_points(b[key] - a[key])} |")
    rows.append(f"| **All classes** | {n} | Calibration error (ECE, lower is better) | {a['ece']:.3f} | {b['ece']:.3f} | "
                f"{b['ece'] - a['ece']:+.3f} |")
    for name in report["classes"]:
        rows.append(f"| {_cell(name)} | | Predicted as | {a['label_counts'][name]} | {b['label_counts'][name]} | "
                    f"{b['label_counts'][name] - a['label_counts'][name]:+d} |")

    paired = report["paired"]
    disagreements, flags = report["disagreements"], report["review_flag_differs"]
    lines = [
        f"Comparison on {'every image' if report['part'] == 'all' else 'the ' + report['part'] + ' images'} of "
        f"`{_cell(Path(report['data']).name)}` ({report['images']} images{', 8-view TTA' if report['tta'] else ''}):",
        "",
        f"- **A**: {_cell(a['name'])} (weights sha256 {a['sha256'][:12]}…; {a['device']})",
        f"- **B**: {_cell(b['name'])} (weights sha256 {b['sha256'][:12]}…; {b['device']})",
        *(["- B lists the classes in another order; its figures are matched to A's by class name."]
          if report["b_classes_reordered"] else []),
        "",
        *rows,
        "",
        "| | B right | B wrong |",
        "|---|---:|---:|",
        f"| **A right** | {paired['both_right']} | {paired['only_a_right']} |",
        f"| **A wrong** | {paired['only_b_right']} | {paired['both_wrong']} |",
        "",
        mcnemar_sentence(paired['only_a_right'], paired['only_b_right'], a['name'], b['name']),
        *_too_few(report["images"], paired["only_a_right"] + paired["only_b_right"]),
        "",
        f"The two models give the same label to {_pct(report['label_agreement'])} of the images; "
        f"they disagree on {len(disagreements)}, and one flags for review what the other does not on {len(flags)}.",
    ]
    if disagreements:
        lines += ["", f"### Images the models label differently ({len(disagreements)})", ""]
        lines += _image_rows(
            "| File | True class | A (confidence) | B (confidence) | Right |\n|---|---|---|---|---|",
            [f"| {_cell(d['file'])} | {_cell(d['true'])} | {_conf(d['a'])} | {_conf(d['b'])} | {d['right']} |"
             for d in disagreements],
            len(disagreements),
        )
    if flags:
        lines += ["", f"### Images only one model flags for review ({len(flags)})", ""]
        lines += _image_rows(
            "| File | True class | A | B |\n|---|---|---|---|",
            [f"| {_cell(f['file'])} | {_cell(f['true'])} | {_flag(f['a'])} | {_flag(f['b'])} |" for f in flags],
            len(flags),
        )
    return "\n".join(lines)


def _flag(entry: dict[str, Any]) -> str:
    return _cell(entry["label"]) + (f", review: {_cell(entry['review_reason'])}" if entry["needs_review"] else "")
