"""Figures for a training run: the confusion matrix and the reliability diagram.

Drawn on bare matplotlib `Figure` objects (Agg canvas, no pyplot), so plotting never needs a display,
never touches global backend state a Qt application may have chosen, and leaks no open figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from trainer.metrics import expected_calibration_error, reliability_bins


def _label(name: str) -> str:
    """Class names on two lines where they carry a tag: '[Malignant] early Pre-B' stays readable
    under a narrow column instead of overlapping its neighbour."""
    return name.replace("] ", "]\n", 1)


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=150, bbox_inches="tight")
    return path


def plot_confusion(cm: Any, classes: Sequence[str], path: Path | str, title: str = "Confusion matrix") -> Path:
    """The confusion matrix (rows = true class) as a PNG: each cell shows its image count and the
    share of its true class; the shading is that row share, so a small class's errors are as
    visible as a large one's."""
    counts = np.asarray(cm, dtype=np.int64)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix is {counts.shape} but there are {len(classes)} classes")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)

    size = 2.2 + 1.5 * len(classes)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    disp = ConfusionMatrixDisplay(share, display_labels=[_label(c) for c in classes])
    disp.plot(ax=ax, cmap="Blues", values_format=".0%", colorbar=True, im_kw={"vmin": 0.0, "vmax": 1.0})
    for (i, j), text in np.ndenumerate(disp.text_):
        text.set_text(f"{counts[i, j]}\n{share[i, j]:.0%}")
    disp.im_.colorbar.set_label("share of the true class")
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"{title} (n = {int(counts.sum())})")
    ax.tick_params(axis="x", labelrotation=30)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    return _save(fig, path)


def plot_reliability(probs: Any, labels: Any, path: Path | str, n_bins: int = 15, title: str = "Reliability") -> Path:
    """Reliability diagram as a PNG: accuracy of the top class per confidence bin against the
    diagonal a perfectly calibrated model would follow, with the ECE in the title and the number
    of images per bin underneath (a bar built on three images means little)."""
    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges, count = bins["edges"], bins["count"]
    width = np.diff(edges)
    used = count > 0
    acc = np.where(used, bins["accuracy"], 0.0)
    conf = np.where(used, bins["confidence"], 0.0)

    fig = Figure(figsize=(6, 6.5))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    ax.bar(edges[:-1], acc, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5,
           label="accuracy")
    ax.bar(edges[:-1][used], (conf - acc)[used], bottom=acc[used], width=width[used], align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.set_title(f"{title}: ECE = {100 * ece:.2f}% (n = {int(count.sum())}, {n_bins} bins)")
    ax.legend(loc="upper left")
    hist.bar(edges[:-1], count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    hist.set_xlabel("Confidence (top-class probability)")
    hist.set_ylabel("Images")
    return _save(fig, path)
