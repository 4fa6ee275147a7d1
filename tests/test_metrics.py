"""trainer.metrics and trainer.plots: the numbers a bundle ships and the README reports."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bcc_desk.bundle import BundleMeta, OODSpec, build_model
from trainer.metrics import (
    FLAG_ALL,
    STUDY,
    choose_ood_threshold,
    choose_review_threshold,
    classification_report,
    expected_calibration_error,
    fit_mahalanobis,
    fit_temperature,
    mahalanobis_scores,
    reliability_bins,
    review_rule_on_halves,
    study_table,
)
from trainer.plots import plot_confusion, plot_reliability

CLASSES = ["Benign", "[Malignant] early Pre-B", "[Malignant] Pre-B", "[Malignant] Pro-B"]


def _labels_from_confusion(cm: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    t, p = [], []
    for i, row in enumerate(cm):
        for j, count in enumerate(row):
            t += [i] * count
            p += [j] * count
    return np.array(t), np.array(p)


# -- classification report ----------------------------------------------------------------------------
# Rows = true class, columns = predicted:
#        A  B  C   | support
#   A  [ 5, 1, 0 ] |  6
#   B  [ 2, 3, 1 ] |  6
#   C  [ 0, 0, 4 ] |  4      predicted totals: A 7, B 4, C 5; n = 16
HAND_CM = [[5, 1, 0], [2, 3, 1], [0, 0, 4]]


def test_report_matches_hand_computed_confusion():
    y_true, y_pred = _labels_from_confusion(HAND_CM)
    rep = classification_report(y_true, y_pred, ["A", "B", "C"])

    assert rep["n"] == 16
    assert rep["confusion_matrix"] == HAND_CM  # rows are the true class
    assert rep["accuracy"] == pytest.approx(12 / 16)  # diagonal 5 + 3 + 4
    a, b, c = rep["per_class"]["A"], rep["per_class"]["B"], rep["per_class"]["C"]
    # precision = diagonal / column total
    assert a["precision"] == pytest.approx(5 / 7)
    assert b["precision"] == pytest.approx(3 / 4)
    assert c["precision"] == pytest.approx(4 / 5)
    # recall = diagonal / row total
    assert a["recall"] == pytest.approx(5 / 6)
    assert b["recall"] == pytest.approx(3 / 6)
    assert c["recall"] == pytest.approx(4 / 4)
    # F1 = 2 TP / (2 TP + FP + FN): A 10/(10+2+1), B 6/(6+1+3), C 8/(8+1+0)
    assert a["f1"] == pytest.approx(10 / 13)
    assert b["f1"] == pytest.approx(6 / 10)
    assert c["f1"] == pytest.approx(8 / 9)
    assert (a["support"], b["support"], c["support"]) == (6, 6, 4)
    # macro-F1 = unweighted mean = (0.769231 + 0.6 + 0.888889) / 3 = 0.752707
    assert rep["macro_f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert rep["macro_f1"] == pytest.approx(0.752707, abs=1e-6)


def test_report_is_json_and_keeps_every_class_without_warnings():
    # Early in training a class may never be predicted and a small split may lack one entirely:
    # the report must still list all four classes in order, with zeros, and raise no warnings.
    y_true = torch.tensor([0, 0, 1, 1, 2])
    y_pred = torch.tensor([0, 0, 0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = classification_report(y_true, y_pred, CLASSES)
    assert json.loads(json.dumps(rep)) == rep
    assert list(rep["per_class"]) == CLASSES
    pro_b = rep["per_class"]["[Malignant] Pro-B"]
    assert pro_b == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0,  # nothing to measure: no intervals
                     "precision_ci": None, "recall_ci": None, "f1_ci": None}
    assert len(rep["confusion_matrix"]) == 4 and all(len(r) == 4 for r in rep["confusion_matrix"])
    with pytest.raises(ValueError, match="outside"):
        classification_report([0, 5], [0, 1], CLASSES)


# -- calibration ---------------------------------------------------------------------------------------
def _calibrated_two_class(per_level: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """At confidence c, exactly a fraction c of the images are right: perfect calibration."""
    probs, labels = [], []
    for c in (0.55, 0.65, 0.75, 0.85, 0.95):
        right = round(c * per_level)
        probs += [[c, 1 - c]] * per_level
        labels += [0] * right + [1] * (per_level - right)
    return np.array(probs), np.array(labels)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    probs, labels = _calibrated_two_class()
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)

    # 99% sure every time but right only 60% of the time: ECE = 0.99 - 0.60.
    over = np.tile([0.99, 0.01], (100, 1))
    y = np.array([0] * 60 + [1] * 40)
    assert expected_calibration_error(over, y) == pytest.approx(0.39)

    bins = reliability_bins(probs, labels, n_bins=10)
    assert bins["count"].sum() == 500 and len(bins["edges"]) == 11
    filled = bins["count"] > 0
    assert np.allclose(bins["accuracy"][filled], bins["confidence"][filled])


def _calibrated_logits(n: int = 4000, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a calibrated model: the labels are drawn from softmax(logits) itself."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, y


def test_temperature_scaling_undoes_overconfidence():
    z, y = _calibrated_logits()
    over = 4 * z  # the same model, four times too sure of itself
    t = fit_temperature(over, y)
    assert t == pytest.approx(4.0, rel=0.1)

    nll_before = torch.nn.functional.cross_entropy(over, y).item()
    nll_after = torch.nn.functional.cross_entropy(over / t, y).item()
    ece_before = expected_calibration_error(torch.softmax(over, 1), y)
    ece_after = expected_calibration_error(torch.softmax(over / t, 1), y)
    assert nll_after < nll_before - 0.1
    assert ece_after < ece_before / 2 and ece_after < 0.03
    # Temperature never changes which class wins: accuracy is untouched.
    assert torch.equal((over / t).argmax(1), over.argmax(1))


def test_temperature_degenerate_and_separable_inputs_stay_sane():
    assert fit_temperature(torch.empty(0, 4), torch.empty(0, dtype=torch.long)) == 1.0
    assert fit_temperature(torch.zeros(5, 1), torch.zeros(5, dtype=torch.long)) == 1.0
    nan = torch.randn(5, 4)
    nan[2, 1] = float("nan")
    assert fit_temperature(nan, torch.zeros(5, dtype=torch.long)) == 1.0
    # Every validation image right by a wide margin: NLL keeps falling as T -> 0, but the
    # shipped temperature must stay within the bounded range, not collapse to 0.
    y = torch.arange(40) % 4
    sep = torch.nn.functional.one_hot(y, 4).float() * 5
    t = fit_temperature(sep, y)
    assert 0.1 <= t < 1.0


# -- review threshold ----------------------------------------------------------------------------------
def test_review_threshold_is_lowest_cutoff_meeting_target_with_one_error_assumed():
    conf = np.linspace(0.40, 0.999, 400)  # sorted, all distinct
    correct = np.ones(400, bool)
    correct[:12] = False  # the twelve least confident are wrong ...
    correct[300] = False  # ... and one confident one, which the rule must tolerate
    # Cut-off at conf[i] (i <= 12) keeps 400 - i images, 13 - i of them wrong.
    # The plain rule takes i = 6: 7 errors among 394 are 98.2% right (>= 98%); i = 5 gives 97.97%.
    # Counting one more error, i = 6 gives (7 + 1) / 395 = 2.03% wrong, over 2%; i = 7: 7 / 394 = 1.78%.
    t = choose_review_threshold(conf, correct, target_accuracy=0.98, max_flagged=0.25)
    assert t == pytest.approx(conf[7])
    assert (conf < t).sum() == 7
    plain = choose_review_threshold(conf, correct, target_accuracy=0.98, max_flagged=0.25, assumed_errors=0)
    assert plain == pytest.approx(conf[6])
    kept = conf >= t
    assert (np.sum(~correct[kept]) + 1) / (kept.sum() + 1) <= 0.02

    # Accurate enough on everything, even with an error assumed: flag nothing.
    assert choose_review_threshold(conf, np.ones(400, bool), target_accuracy=0.99) == 0.0
    # 100 right of 100 is not yet evidence of 99%: (0 + 1) / 101 is 0.99%, just enough; 98 of 98 is not.
    assert choose_review_threshold(conf[:100], np.ones(100, bool), target_accuracy=0.99) == 0.0
    assert choose_review_threshold(conf[:98], np.ones(98, bool), target_accuracy=0.99) > 0.0


def test_a_model_that_cannot_keep_the_promise_flags_every_image():
    """#37: the cut-off never falls back to a share of the images (a confident error would then go
    out unflagged): out of reach within a quarter flagged, every image is flagged."""
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.3, 1.0, 200)
    correct = np.ones(200, bool)
    correct[np.argsort(conf)[-20:][::2]] = False  # errors among the most confident images
    t = choose_review_threshold(conf, correct, target_accuracy=0.99, max_flagged=0.25)
    assert t == FLAG_ALL == 1.0 and (conf < t).all()
    # The rule before #37, which the review-rule studies of recipe.md were made with: the least confident quarter.
    old = choose_review_threshold(conf, correct, target_accuracy=0.99, max_flagged=0.25, when_short="least confident")
    assert (conf < old).sum() == 50 and correct[conf >= old].mean() < 0.99  # the target really was out of reach


def test_review_rule_on_held_out_halves_shows_the_assumed_error_pays():
    """Calibrated predictions (right as often as they say): the plain rule, chosen where it just
    reaches 99%, falls short on the other half about half the time; one assumed error falls short
    less often and flags more.  A model always right is never short and flags nothing."""
    rng = np.random.default_rng(3)
    sure = rng.uniform(size=800) < 0.85  # mostly confident, as a good model is
    conf = np.where(sure, 1 - rng.exponential(0.006, 800), rng.uniform(0.5, 0.95, 800))
    correct = rng.uniform(size=800) < conf
    groups = np.arange(800) // 2  # pairs of near-duplicates
    odd = np.zeros(800, bool)
    plain = review_rule_on_halves(conf, correct, odd, groups, assumed_errors=0, draws=300)
    safer = review_rule_on_halves(conf, correct, odd, groups, assumed_errors=1, draws=300)
    assert 0.3 < plain["short_of_target"] < 0.7
    assert safer["short_of_target"] < plain["short_of_target"] - 0.1
    assert safer["median_flagged"] > plain["median_flagged"]
    perfect = review_rule_on_halves(conf, np.ones(800, bool), odd, groups, draws=50)
    assert perfect["short_of_target"] == 0 and perfect["median_flagged"] == 0
    # The unfamiliar images are flagged whatever their confidence.
    assert review_rule_on_halves(conf, np.ones(800, bool), np.ones(800, bool), groups, draws=5)["median_flagged"] == 1
    with pytest.raises(ValueError, match="two groups"):
        review_rule_on_halves(conf, correct, odd, np.zeros(800))


def test_review_rule_on_halves_names_the_group_that_decides_it():
    """Errors cluster in a slide: when one group holds all the confident errors, the held-out half
    falls short exactly when it holds that group, and the study names it; no other group."""
    rng = np.random.default_rng(5)
    groups = np.arange(400) // 10  # 40 slides of 10 images
    conf = rng.uniform(0.6, 1.0, 400)
    correct = np.ones(400, bool)
    bad = np.flatnonzero(groups == 7)[:3]
    conf[bad], correct[bad] = 0.999, False  # three confidently wrong fields on one slide
    h = review_rule_on_halves(conf, correct, np.zeros(400, bool), groups, draws=400)
    assert 0.35 < h["short_of_target"] < 0.65
    assert h["deciding_groups"] == [(7, 1.0, 0.0)]
    # Two such slides: both are named, each short whenever it is held out.
    bad2 = np.flatnonzero(groups == 21)[:3]
    conf[bad2], correct[bad2] = 0.999, False
    two = review_rule_on_halves(conf, correct, np.zeros(400, bool), groups, draws=400)["deciding_groups"]
    assert sorted(g for g, _, _ in two) == [7, 21] and all(out == 1.0 for _, out, _ in two)
    # Unsure errors spread over slides, which the rule flags: no group decides anything.
    spread_conf, spread = conf.copy(), np.ones(400, bool)
    unsure = np.arange(0, 400, 50)  # one image on each of 8 slides
    spread_conf[unsure], spread[unsure] = 0.55, False
    assert review_rule_on_halves(spread_conf, spread, np.zeros(400, bool), groups, draws=400)["deciding_groups"] == []


# -- out-of-distribution check -------------------------------------------------------------------------
def _gaussian_classes(n_per: int, rng: np.random.Generator, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    means = np.array([np.zeros(d), np.full(d, 6.0), np.r_[np.full(d // 2, -6.0), np.zeros(d - d // 2)]])
    mix = np.eye(d) + 0.5 * np.diag(np.ones(d - 1), 1)  # correlated, shared by every class
    y = np.repeat(np.arange(3), n_per)
    x = means[y] + rng.standard_normal((y.size, d)) @ mix.T
    return x, y


def test_mahalanobis_flags_about_max_flagged_in_distribution_and_all_far_points():
    rng = np.random.default_rng(0)
    x_train, y_train = _gaussian_classes(600, rng)
    x_val, _ = _gaussian_classes(300, rng)
    x_test, _ = _gaussian_classes(2000, rng)

    means, precision = fit_mahalanobis(x_train, y_train, 3)
    assert means.shape == (3, 8) and precision.shape == (8, 8)
    assert np.allclose(precision, precision.T)
    threshold = choose_ood_threshold(mahalanobis_scores(x_val, means, precision), max_flagged=0.05)

    passed = (mahalanobis_scores(x_test, means, precision) <= threshold).mean()
    assert 0.92 <= passed <= 0.98  # ~95% of fresh in-distribution images pass
    far = rng.standard_normal((200, 8)) + 40.0 * np.r_[1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    assert (mahalanobis_scores(far, means, precision) > threshold).all()


def test_ood_threshold_flags_at_most_the_allowed_share_of_validation():
    scores = np.arange(1, 101, dtype=float)  # 1 .. 100
    t = choose_ood_threshold(scores, max_flagged=0.05)
    assert t == 95.0 and (scores > t).sum() == 5  # the smallest such threshold
    assert (scores > np.nextafter(t, 0)).sum() == 6


def test_shrinkage_gives_a_usable_precision_with_fewer_images_than_features():
    # 768 features from ~1,900 images in the real run; here 64 features from 40 images,
    # where the plain sample covariance is singular.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 64))
    y = np.arange(40) % 4
    for shrinkage in ("ledoit-wolf", "oas", 0.2):
        _, precision = fit_mahalanobis(x, y, 4, shrinkage=shrinkage)
        assert np.isfinite(precision).all()
        assert np.linalg.eigvalsh(precision).min() > 0
    with pytest.raises(ValueError, match="class"):
        fit_mahalanobis(x, np.zeros(40, int), 4)  # classes 1..3 have no images


def test_scores_agree_with_the_bundle_network():
    meta = BundleMeta(name="t", arch="convnext_atto", classes=CLASSES, ood=OODSpec(threshold=1.0))
    net = build_model(meta)
    d = net.num_features  # 320 for convnext_atto
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(400, d, generator=g) + torch.arange(400).remainder(4)[:, None].float()
    means, precision = fit_mahalanobis(feats, torch.arange(400) % 4, 4)
    with torch.no_grad():
        net.ood_means.copy_(torch.as_tensor(means, dtype=torch.float32))
        net.ood_precision.copy_(torch.as_tensor(precision, dtype=torch.float32))
        probe = torch.randn(50, d, generator=g) * 1.5
        app = net.ood_score(probe).numpy()
    ours = mahalanobis_scores(probe.numpy(), means, precision)
    np.testing.assert_allclose(app, ours, rtol=1e-3)


# -- plots and the study table -------------------------------------------------------------------------
def test_plots_are_readable_pngs(tmp_path):
    cm = [[120, 3, 0, 1], [2, 110, 9, 0], [0, 7, 115, 0], [0, 0, 1, 100]]
    p = plot_confusion(cm, CLASSES, tmp_path / "figs" / "confusion.png")
    z, y = _calibrated_logits(n=500)
    r = plot_reliability(torch.softmax(3 * z, 1).numpy(), y.numpy(), tmp_path / "reliability.png")
    for path in (p, r):
        assert path.is_file() and path.stat().st_size > 1000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300


def test_study_table_lists_every_class_and_the_reference_accuracy():
    y_true, y_pred = _labels_from_confusion([[60, 2, 0, 0], [2, 109, 3, 0], [0, 2, 118, 0], [0, 0, 0, 100]])
    table = study_table(classification_report(y_true, y_pred, CLASSES))
    for name in CLASSES:
        assert f"| {name} |" in table
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3 * len(CLASSES) + 2  # header, rule, 3 metrics per class, 2 overall rows
    assert all(line.count("|") == 6 for line in lines)
    accuracy = next(line for line in lines if "Accuracy" in line)
    # ours: (60 + 109 + 118 + 100) / 396 = 387 / 396 = 97.73%, with its Wilson interval; the study's 98.36% beside it
    assert accuracy.endswith("| 97.73% (95.7-98.8) | 98.36% |")
    if not STUDY["per_class"]:  # unpublished per-class figures must show as n/a, never invented
        assert next(line for line in lines if "Precision" in line).endswith("| n/a |")


def test_every_figure_carries_its_95_percent_interval():
    """#37: on a lab's few hundred images a point of accuracy is within chance: each share gets
    Wilson's interval (scipy's), F1 a bootstrap interval that holds the figure itself."""
    from scipy.stats import binomtest

    y_true, y_pred = _labels_from_confusion([[8, 2, 0, 0], [1, 9, 0, 0], [0, 3, 7, 0], [0, 0, 0, 10]])
    r = classification_report(y_true, y_pred, CLASSES)
    ci = binomtest(34, 40).proportion_ci(method="wilson")
    assert r["accuracy_ci"] == pytest.approx([ci.low, ci.high])
    benign = r["per_class"][CLASSES[0]]
    recall = binomtest(8, 10).proportion_ci(method="wilson")
    precision = binomtest(8, 9).proportion_ci(method="wilson")
    assert benign["recall_ci"] == pytest.approx([recall.low, recall.high])
    assert benign["precision_ci"] == pytest.approx([precision.low, precision.high])
    for c in CLASSES[:3]:  # the classes with errors: 10 images each give a wide interval
        lo, hi = r["per_class"][c]["f1_ci"]
        assert lo <= r["per_class"][c]["f1"] <= hi and hi - lo > 0.05
    assert r["per_class"][CLASSES[3]]["f1_ci"] == [1.0, 1.0]  # never wrong in any draw
    assert r["macro_f1_ci"][0] <= r["macro_f1"] <= r["macro_f1_ci"][1]
    assert classification_report(y_true, y_pred, CLASSES) == r  # seeded: the same report every time
    # A class never predicted has no precision interval; one absent from the images, no recall one.
    none = classification_report([0, 0, 1, 1], [0, 0, 0, 0], CLASSES)
    assert none["per_class"][CLASSES[1]]["precision_ci"] is None and none["per_class"][CLASSES[2]]["recall_ci"] is None
