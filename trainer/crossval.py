"""Cross-validation for small data sets (issue #37): on a lab's few hundred images one
validation part is too small to measure a model, so `fit` also trains the same recipe on k
folds of the slides (groups) and judges each on the fold it did not see.  The shipped model is
still the one `fit` trains on its own split; the folds only measure.

Each fold's model is judged at its last epoch (never the best on the fold it is judged on: that
would flatter it), through the trainer's own validation pass.  Reported: every fold's accuracy
and macro-F1, their mean with a t interval over the folds, and the pooled accuracy of all
held-out images with its Wilson interval.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.model_selection import StratifiedGroupKFold

from bcc_desk.stats import wilson_interval
from trainer.split import Split

log = logging.getLogger("bcc-train")

SMALL_DATA = 1000
"""Data sets with fewer images are cross-validated by default (`FitConfig.cv_folds` None)."""
FOLDS = 5


# `cfg` below is trainer.config's FitConfig, passed in with its `fit` (this module is imported by it).


def folds_for(cfg: Any, split: Split, world: int) -> int:
    """How many folds this run cross-validates over (0: none): `cfg.cv_folds` when given, else
    `FOLDS` for a small data set trained in one process."""
    if cfg.cv_folds is not None:
        return cfg.cv_folds
    return FOLDS if len(split.rows) < SMALL_DATA and world == 1 else 0


def cross_validate(cfg: Any, split: Split, folds: int, fit: Callable[[Any], Path]) -> dict[str, Any]:
    """Train `cfg` with `fit` on `folds` grouped, stratified folds of every image of `split`;
    returns the figures (also written to RUN/crossval/crossval.md).  Raises ValueError when the
    slides are too few for the folds (and whatever a fold's `fit` raises)."""
    y = [split.classes.index(r.cls) for r in split.rows]
    groups = [r.group for r in split.rows]
    if len(set(groups)) < folds:
        raise ValueError(f"cross-validation over {folds} folds needs at least {folds} groups (slides), not {len(set(groups))}")
    base = Path(cfg.out) / "crossval"
    rows = []
    kfold = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    for k, (_, held) in enumerate(kfold.split(np.zeros(len(y)), y, groups), start=1):
        held_out = set(held.tolist())
        fold = Split(rows=[replace(r, split="val" if i in held_out else "train") for i, r in enumerate(split.rows)],
                     classes=list(split.classes), seed=None)
        run = base / f"fold-{k}"
        run.mkdir(parents=True, exist_ok=True)
        fold.save(run / "split.csv")
        log.info("cross-validation fold %d of %d: %d images held out", k, folds, len(held_out))
        fit(replace(cfg, out=run, split=run / "split.csv", cv_folds=0, finish=False, int8=False, ood_dir=None))
        with open(run / "history.csv", newline="", encoding="utf-8") as fh:
            last = list(csv.DictReader(fh))[-1]  # the last epoch: never the best on the fold it is judged on
        rows.append({"fold": k, "images": len(held_out), "accuracy": float(last["val_acc"]),
                     "macro_f1": float(last["val_macro_f1"])})
        for name in ("last.pt", "best.safetensors"):  # the folds only measure: keep their split and history
            (run / name).unlink(missing_ok=True)
    result = summarise(rows)
    (base / "crossval.md").write_text(markdown(result), encoding="utf-8")
    return result


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of the folds with its 95% t interval, and the pooled held-out accuracy with Wilson's."""
    acc = np.array([r["accuracy"] for r in rows])
    f1 = np.array([r["macro_f1"] for r in rows])
    n = sum(r["images"] for r in rows)
    right = round(sum(r["accuracy"] * r["images"] for r in rows))

    def t_ci(x: np.ndarray) -> list[float]:
        if len(x) < 2:
            return [float(x.mean()), float(x.mean())]
        half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        return [float(max(0.0, x.mean() - half)), float(min(1.0, x.mean() + half))]

    return {"folds": rows, "accuracy_mean": float(acc.mean()), "accuracy_ci": t_ci(acc),
            "macro_f1_mean": float(f1.mean()), "macro_f1_ci": t_ci(f1), "images": n,
            "pooled_accuracy": right / n, "pooled_accuracy_ci": list(wilson_interval(right, n))}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| fold | held-out images | accuracy | macro-F1 |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['fold']} | {r['images']} | {r['accuracy']:.1%} | {r['macro_f1']:.1%} |" for r in result["folds"]]
    lo, hi = result["accuracy_ci"]
    plo, phi = result["pooled_accuracy_ci"]
    lines += ["", f"Mean accuracy {result['accuracy_mean']:.1%} (95% CI over the folds {lo:.1%}-{hi:.1%}); "
                  f"all {result['images']} held-out images together {result['pooled_accuracy']:.1%} "
                  f"(Wilson 95% CI {plo:.1%}-{phi:.1%}). Each fold's model at its last epoch."]
    return "\n".join(lines) + "\n"
