"""Evaluation and calibration numbers for a fitted model.

Pure functions: NumPy arrays or torch tensors in, plain Python / NumPy out, so the same code scores
a run on the validation split, on the test split, and in the tests.  Classification metrics come
from scikit-learn rather than hand-written copies, so our numbers mean what everyone else's mean.

What the bundle ships comes from here:
- `fit_temperature`: the softmax temperature that makes the displayed confidences honest;
- `choose_review_threshold`: the confidence under which an image is sent for human review
  (`review_rule_on_halves`: how that rule holds on validation images it was not chosen on);
- `fit_mahalanobis` / `choose_ood_threshold`: the "does not look like the training data" check,
  scored exactly as `bcc_desk.bundle.BundleNet.ood_score` scores it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from sklearn.covariance import OAS, LedoitWolf, ShrunkCovariance
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from bcc_desk.stats import wilson_interval

ArrayLike: TypeAlias = np.ndarray | torch.Tensor | Sequence[Any]

# The reference study we compare against: ConvNeXt Tiny on the Taleqani Hospital B-ALL 4-class
# peripheral blood smear data set ("Blood Cell Cancer ALL-4Class"; Aria, Ghaderzadeh, Bashash et al.
# 2021; https://www.kaggle.com/datasets/mohammadamireshraghi/blood-cell-cancer-all-4class), Adam,
# cross-entropy, 25 epochs, flip/rotation/brightness augmentation, 70/15/15 split.
# Only the overall test accuracy (98.36%, as stated in this project's brief) is recorded.  We searched
# for the study's per-class precision/recall/F1 table and did not find a citable copy, so the per-class
# cells are left empty ("n/a" in the table) rather than filled with numbers nobody can check.
STUDY: dict[str, Any] = {
    "name": "ConvNeXt Tiny, Taleqani B-ALL 4-class (reference study)",
    "accuracy": 0.9836,
    "macro_f1": None,
    "per_class": {},  # class name -> {"precision": ..., "recall": ..., "f1": ...} once a source is found
}

TEMPERATURE_BOUNDS = (0.1, 10.0)


def _np(x: ArrayLike, dtype: Any = None) -> np.ndarray:
    """NumPy view of a tensor / array / list (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


# -- classification ---------------------------------------------------------------------------------
def classification_report(y_true: ArrayLike, y_pred: ArrayLike, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows = true class, columns = predicted), as plain JSON-serialisable Python values, each
    figure with its 95% interval (`*_ci`, issue #37: on a lab's few hundred images a point of
    accuracy is within chance): Wilson's for the shares (accuracy, precision, recall), the
    percentile bootstrap over images for F1 and macro-F1 (`BOOTSTRAP_DRAWS`, seeded).

    Every class in `classes` is reported, also one missing from this split (support 0), so reports
    of different runs line up row for row; a class never predicted gets precision 0, not a warning."""
    t = _np(y_true).astype(int).ravel()
    p = _np(y_pred).astype(int).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    labels = list(range(len(classes)))
    out_of_range = sorted({int(v) for v in np.concatenate([t, p]) if not 0 <= v < len(classes)})
    if out_of_range:
        raise ValueError(f"labels {out_of_range} are outside the {len(classes)} classes")
    if t.size == 0:
        raise ValueError("no predictions to score")
    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    cm = confusion_matrix(t, p, labels=labels).astype(int)
    f1_ci, macro_ci = bootstrap_f1(t, p, len(classes))
    return {
        "n": int(t.size),
        "accuracy": float(accuracy_score(t, p)),
        "accuracy_ci": _share_ci(int(np.trace(cm)), int(t.size)),
        "macro_f1": float(f1_score(t, p, labels=labels, average="macro", zero_division=0)),
        "macro_f1_ci": macro_ci,
        "classes": [str(c) for c in classes],
        "per_class": {
            str(c): {
                "precision": float(prec[i]),
                "precision_ci": _share_ci(int(cm[i, i]), int(cm[:, i].sum())),
                "recall": float(rec[i]),
                "recall_ci": _share_ci(int(cm[i, i]), int(cm[i].sum())),
                "f1": float(f1[i]),
                "f1_ci": f1_ci[i],
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }


BOOTSTRAP_DRAWS = 2000


def _share_ci(k: int, n: int) -> list[float] | None:
    return list(wilson_interval(k, n)) if n else None


def bootstrap_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
                 ) -> tuple[list[list[float] | None], list[float]]:
    """95% percentile-bootstrap intervals of each class's F1 and of macro-F1: the images drawn
    with replacement `draws` times (a class absent from a draw counts F1 0, as sklearn does)."""
    rng = np.random.default_rng(seed)
    n = y_true.size
    idx = rng.integers(0, n, size=(draws, n))
    cells = k * y_true[idx] + y_pred[idx]
    cms = np.stack([np.bincount(row, minlength=k * k) for row in cells]).reshape(draws, k, k)
    tp = np.diagonal(cms, axis1=1, axis2=2).astype(np.float64)
    denom = cms.sum(axis=2) + cms.sum(axis=1)  # 2tp + fn + fp
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    per_class = [[float(v) for v in np.percentile(f1[:, i], [2.5, 97.5])] if (y_true == i).any() else None
                 for i in range(k)]
    return per_class, [float(v) for v in np.percentile(f1.mean(axis=1), [2.5, 97.5])]


# -- calibration ------------------------------------------------------------------------------------
def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability diagram data: `n_bins` equal-width confidence bins over (0, 1], each
    with its image count, mean confidence and accuracy (NaN where a bin is empty).

    A bin holds the images whose top-class probability lies in (lo, hi]; the first also takes 0."""
    p = _np(probs, np.float64)
    y = _np(labels).astype(int).ravel()
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probs must be (n, classes) with one row per label; got {p.shape} for {y.size} labels")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): the image-weighted mean gap between confidence and accuracy
    over equal-width confidence bins.  0 means "90% confident" is right 90% of the time."""
    bins = reliability_bins(probs, labels, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return 0.0
    used = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float((gaps * bins["count"][used]).sum() / n)


def fit_temperature(
    logits: ArrayLike, labels: ArrayLike, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, max_iter: int = 100
) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the validation NLL of softmax(logits/T).

    One scalar cannot change which class wins, only how sure the model claims to be, so accuracy is
    untouched while confidences become honest.  LBFGS works on log T so T stays positive; the result
    is clipped to `bounds` (a perfectly separated validation set would otherwise drive T to 0).
    Empty, single-class or non-finite input returns 1.0 (no change)."""
    z = torch.as_tensor(_np(logits, np.float64))
    y = torch.as_tensor(_np(labels).astype(np.int64).ravel())
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2 or not bool(torch.isfinite(z).all()):
        return 1.0
    if z.shape[0] != y.numel():
        raise ValueError(f"{z.shape[0]} rows of logits but {y.numel()} labels")
    if bool((y < 0).any()) or bool((y >= z.shape[1]).any()):
        raise ValueError(f"labels must lie in 0..{z.shape[1] - 1}")

    def nll(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(z / t, y)

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    t = min(max(t, bounds[0]), bounds[1])
    # NLL is convex in 1/T, so the clipped optimum can't be worse than T=1 unless LBFGS failed.
    with torch.no_grad():
        if nll(torch.tensor(t, dtype=torch.float64)) > nll(torch.tensor(1.0, dtype=torch.float64)):
            return 1.0
    return t


# -- review threshold -------------------------------------------------------------------------------
SLIDE_FLOOR = 0.5
"""The least cut-off for an image that agrees with its slide: when validation shows no error among
such images the rule's own choice falls to 0, and a label the model itself gives less than even
odds must still be seen by a person (a slide misread as a whole agrees with itself)."""


def slide_floor(alone: float) -> float:
    """The least cut-off for an image its slide agrees with: even odds (`SLIDE_FLOOR`), never
    above `alone`, the cut-off for an image alone in its slide."""
    return min(SLIDE_FLOOR, alone)


FLAG_ALL = 1.0
"""The review threshold of a model that cannot keep the promise: every image is flagged."""


def choose_review_threshold(
    confidences: ArrayLike, correct: ArrayLike, target_accuracy: float = 0.99, max_flagged: float = 0.25,
    assumed_errors: int = 1, when_short: str = "flag all",
) -> float:
    """The confidence under which an image is flagged for review.

    Rule: we pick the lowest confidence cut-off such that, on the validation images, the
    predictions at or above it were right at least 99% of the time (`target_accuracy`) even
    counting `assumed_errors` more kept images as wrong: (errors + 1) / (kept + 1) <= 1%.  If that
    would send more than a quarter of the images (`max_flagged`) to review, the model cannot keep
    the promise: it flags every image (`FLAG_ALL`, issue #37; such a bundle is also judged not
    validated).  `when_short="least confident"` is the rule before #37, which then flagged exactly
    the least confident quarter (the review-rule studies of recipe.md were made with it).

    Why the extra error: the lowest cut-off that just reaches 99% on validation is, by its choice,
    the one whose validation figure flatters it most; on new images it falls short about half the
    time (on held-out halves of v4's validation: 52%; on its test split: 98.9%).  One assumed
    error is the usual small-sample correction (as in conformal prediction): 35% on the same
    halves (docs/default-model/review-rule.md).  `assumed_errors=0` is the plain rule.

    Returns 0.0 (flag nothing) when all of validation meets the target, errors assumed too.  An
    image is flagged when its confidence is strictly below the returned value."""
    conf = _np(confidences, np.float64).ravel()
    ok = _np(correct).astype(bool).ravel()
    if conf.size == 0:
        raise ValueError("no validation predictions to choose a review threshold from")
    if conf.shape != ok.shape:
        raise ValueError(f"{conf.size} confidences but {ok.size} correctness values")
    if not 0 < target_accuracy <= 1 or not 0 <= max_flagged <= 1 or assumed_errors < 0:
        raise ValueError("target_accuracy must be in (0, 1], max_flagged in [0, 1] and assumed_errors >= 0")
    n = conf.size
    a = assumed_errors
    if (n - ok.sum() + a) / (n + a) <= 1 - target_accuracy + 1e-12:
        return 0.0
    order = np.argsort(conf, kind="stable")
    s, c = conf[order], ok[order]
    # Cut-off s[i] keeps images i..n-1 (those with confidence >= s[i]); only the first index of
    # each distinct confidence is a real cut-off, since ties are kept or flagged together.
    correct_kept = np.cumsum(c[::-1])[::-1]
    kept = n - np.arange(n)
    firsts = np.unique(s, return_index=True)[1]
    meets = firsts[(kept[firsts] - correct_kept[firsts] + a) / (kept[firsts] + a) <= 1 - target_accuracy + 1e-12]
    if meets.size and meets.min() <= math.floor(max_flagged * n + 1e-9):  # index = images flagged
        return float(s[meets.min()])
    if when_short == "least confident":
        return _flag_lowest(s, max_flagged)
    if when_short != "flag all":
        raise ValueError(f"when_short must be 'flag all' or 'least confident', not {when_short!r}")
    return FLAG_ALL


def review_rule_on_halves(
    confidences: ArrayLike, correct: ArrayLike, unfamiliar: ArrayLike, groups: ArrayLike,
    assumed_errors: int = 1, target_accuracy: float = 0.99, draws: int = 2000, seed: int = 0,
    choose_among_unflagged: bool = False, floor: float = 0.0,
) -> dict[str, Any]:
    """How the review rule fares on images it was not chosen on, from validation alone: `draws`
    times, half the groups (near-duplicates stay together) choose the cut-off and the other half
    is flagged with it (low confidence or `unfamiliar`).  Returns how often the held-out half's
    unflagged images fall short of `target_accuracy`, the median (and 90th centile) share flagged
    there, and `deciding_groups`: the groups whose presence in the held-out half changes that
    rate most (errors cluster in a slide, so one group can decide it), as (group, rate when held
    out, rate otherwise), largest difference first, those at least 20 points apart.
    `unfamiliar` is every image another reason flags; `choose_among_unflagged` chooses the
    cut-off on the other images alone, as the trainer does for an image in a slide; `floor` is
    the least cut-off it may take."""
    conf = _np(confidences, np.float64).ravel()
    ok = _np(correct).astype(bool).ravel()
    odd = _np(unfamiliar).astype(bool).ravel()
    grp = _np(groups).ravel()
    names = np.unique(grp)
    if names.size < 2:
        raise ValueError("at least two groups are needed to hold half of them out")
    rng = np.random.default_rng(seed)
    short, right, flagged = [], [], []
    held_out = np.zeros((draws, names.size), bool)
    for d in range(draws):
        choosing = rng.choice(names, names.size // 2, replace=False)
        a = np.isin(grp, choosing)
        held_out[d] = ~np.isin(names, choosing)
        c = a & ~odd if choose_among_unflagged else a
        # the studies' rule as they were made (recipe.md): a half short of the target flags its least confident quarter
        t = max(floor, choose_review_threshold(conf[c], ok[c], target_accuracy, assumed_errors=assumed_errors,
                                               when_short="least confident"))
        keep = ~a & (conf >= t) & ~odd
        share_right = float(ok[keep].mean()) if keep.any() else 1.0
        short.append(share_right < target_accuracy)
        right.append(share_right)
        flagged.append(1 - keep.sum() / (~a).sum())
    was_short = np.array(short)
    deciding = []
    for j, name in enumerate(names):
        out, rest = was_short[held_out[:, j]], was_short[~held_out[:, j]]
        if out.size and rest.size and out.mean() - rest.mean() >= 0.2:
            deciding.append((name.item(), float(out.mean()), float(rest.mean())))
    deciding.sort(key=lambda g: g[2] - g[1])
    return {"draws": draws, "short_of_target": float(was_short.mean()),
            "median_unflagged_right": float(np.median(right)), "median_flagged": float(np.median(flagged)),
            "p90_flagged": float(np.percentile(flagged, 90)), "deciding_groups": deciding}


def _flag_lowest(sorted_conf: np.ndarray, share: float) -> float:
    """The cut-off that flags (confidence < cut-off) the lowest floor(share * n) images; ties at
    the boundary are kept, so at most that many are flagged."""
    m = int(math.floor(share * sorted_conf.size + 1e-9))
    if m <= 0:
        return 0.0
    if m >= sorted_conf.size:
        return float(np.nextafter(sorted_conf[-1], np.inf))
    return float(sorted_conf[m])


# -- out-of-distribution check ----------------------------------------------------------------------
def fit_mahalanobis(
    features: ArrayLike, labels: ArrayLike, n_classes: int, shrinkage: str | float = "ledoit-wolf"
) -> tuple[np.ndarray, np.ndarray]:
    """Class means (k, d) and the precision (d, d) of one covariance shared by all classes.

    The shared covariance is estimated on the class-centred features with shrinkage: 768 ConvNeXt
    features from ~1,900 training images make the plain sample covariance nearly singular, and
    inverting it would turn noise directions into huge distances.  `shrinkage` is "ledoit-wolf",
    "oas" (both choose the amount from the data) or a fixed coefficient in [0, 1]."""
    f = _np(features, np.float64)
    y = _np(labels).astype(int).ravel()
    if f.ndim != 2 or f.shape[0] != y.size:
        raise ValueError(f"features must be (n, d) with one row per label; got {f.shape} for {y.size} labels")
    counts = np.bincount(y[(y >= 0) & (y < n_classes)], minlength=n_classes)
    if (y < 0).any() or (y >= n_classes).any():
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    if (counts == 0).any():
        raise ValueError(f"no training features for class(es) {np.flatnonzero(counts == 0).tolist()}")
    means = np.stack([f[y == k].mean(axis=0) for k in range(n_classes)])
    centred = f - means[y]
    if isinstance(shrinkage, str):
        name = shrinkage.lower().replace("_", "-")
        if name in ("ledoit-wolf", "ledoitwolf", "lw"):
            est = LedoitWolf(assume_centered=True)
        elif name == "oas":
            est = OAS(assume_centered=True)
        else:
            raise ValueError(f"unknown shrinkage {shrinkage!r}: use 'ledoit-wolf', 'oas' or a number in [0, 1]")
    else:
        if not 0 <= float(shrinkage) <= 1:
            raise ValueError(f"shrinkage coefficient must be in [0, 1], got {shrinkage}")
        est = ShrunkCovariance(shrinkage=float(shrinkage), assume_centered=True)
    est.fit(centred)
    precision = np.asarray(est.precision_, dtype=np.float64)
    precision = (precision + precision.T) / 2  # exact symmetry, so float32 copies agree
    return means, precision


def mahalanobis_scores(features: ArrayLike, means: ArrayLike, precision: ArrayLike) -> np.ndarray:
    """Squared Mahalanobis distance of each row to its nearest class mean: the same number
    `BundleNet.ood_score` computes in the application."""
    f = _np(features, np.float64)
    mu = _np(means, np.float64)
    prec = _np(precision, np.float64)
    if f.ndim != 2 or mu.ndim != 2 or f.shape[1] != mu.shape[1] or prec.shape != (f.shape[1], f.shape[1]):
        raise ValueError(f"shape mismatch: features {f.shape}, means {mu.shape}, precision {prec.shape}")
    best = np.full(f.shape[0], np.inf)
    for m in mu:  # one class at a time: (n, d) memory instead of (n, k, d)
        diff = f - m
        best = np.minimum(best, np.einsum("nd,de,ne->n", diff, prec, diff, optimize=True))
    return best


def choose_ood_threshold(val_scores: ArrayLike, max_flagged: float = 0.05) -> float:
    """The smallest distance threshold that flags at most `max_flagged` of the validation images
    (an image is flagged when its score is above the threshold): the (1 - max_flagged) quantile
    of the validation scores, taken as an observed score so the promise holds exactly.

    Validation images are in-distribution by construction, so this fixes the false-alarm rate on
    ordinary images; how much truly foreign input is caught is then measured, not assumed."""
    s = np.sort(_np(val_scores, np.float64).ravel())
    if s.size == 0:
        raise ValueError("no validation scores to choose an OOD threshold from")
    if not 0 <= max_flagged <= 1:
        raise ValueError(f"max_flagged must be in [0, 1], got {max_flagged}")
    m = int(math.floor(max_flagged * s.size + 1e-9))  # images we may flag
    if m >= s.size:
        return float(np.nextafter(s[0], -np.inf))
    return float(s[s.size - 1 - m])


# -- comparison with the reference study ------------------------------------------------------------
def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}%"


def pct_ci(v: float | None, ci: Sequence[float] | None) -> str:
    """A figure with its 95% interval: "96.30% (94.0-97.8)"."""
    return pct(v) if ci is None or v is None else f"{pct(v)} ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"


def study_table(report: dict[str, Any], study: dict[str, Any] | None = None) -> str:
    """A Markdown table of our per-class precision/recall/F1 next to the reference study's, then
    overall accuracy and macro-F1; a figure the study did not publish reads "n/a", never a guess.

    One row per (class, metric) so each number sits next to the one it is compared with."""
    study = STUDY if study is None else study
    per_study = study.get("per_class") or {}
    rows = [
        "| Class | Images | Metric | This model (95% CI) | Reference study |",
        "|---|---:|---|---:|---:|",
    ]
    for name in report.get("classes") or list(report["per_class"]):
        ours = report["per_class"][name]
        theirs = per_study.get(name) or {}
        label, support = name.replace("|", "\\|"), str(ours["support"])
        for metric, key in (("Precision", "precision"), ("Recall", "recall"), ("F1", "f1")):
            rows.append(f"| {label} | {support} | {metric} | {pct_ci(ours[key], ours.get(key + '_ci'))} | {pct(theirs.get(key))} |")
            label, support = "", ""
    n = str(report["n"])
    rows.append(f"| **All classes** | {n} | Accuracy | {pct_ci(report['accuracy'], report.get('accuracy_ci'))} | "
                f"{pct(study.get('accuracy'))} |")
    rows.append(f"| **All classes** | {n} | Macro-F1 | {pct_ci(report['macro_f1'], report.get('macro_f1_ci'))} | "
                f"{pct(study.get('macro_f1'))} |")
    return "\n".join(rows) + "\n"
