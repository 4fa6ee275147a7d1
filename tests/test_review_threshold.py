"""The review threshold is chosen on every numerics a lab may run, the strictest kept."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bcc_desk.bundle import load_bundle, read_meta
from bcc_desk.prediction import Prediction
from trainer.review_threshold import choose_thresholds, ood_predictions

from bundles import make_bundle
from conftest import OOD_DEV


def _prediction(label: str, confidence: float, ood_score: float | None = None) -> Prediction:
    return Prediction(path=Path("/x.jpg"), file="x.jpg", slide="s", label=label, confidence=confidence, margin=0.0,
                      probabilities={}, needs_review=False, review_reason="", error=None, model="m", model_sha256="0",
                      ood_score=ood_score)


def test_the_stricter_numerics_sets_the_threshold_and_the_weights_stay(tmp_path: Path) -> None:
    """200 validation images, 3 wrong.  In fp32 the errors are the least confident; in int8 one
    error's confidence rose to 0.92 (rounding moves it): only a cut-off above 0.92 keeps int8's
    unflagged images 99% right (counting one error more, `choose_review_threshold`), and that is
    the one the bundle must carry."""
    bundle = shutil.copytree(make_bundle(tmp_path / "src"), tmp_path / "b")
    sha = load_bundle(bundle).sha256
    truth = ["Benign"] * 200
    conf = [0.90 + 0.00045 * i for i in range(200)]  # 0.90 .. 0.98955
    fp32 = [_prediction("Pro-B" if i < 3 else "Benign", c) for i, c in enumerate(conf)]
    int8 = [_prediction("Pro-B" if i < 3 else "Benign", 0.92 if i == 2 else c) for i, c in enumerate(conf)]
    threshold = choose_thresholds(bundle, truth, {"fp32": fp32, "int8": int8})
    meta = read_meta(bundle)
    chosen = meta.metrics["review_threshold_by_precision"]
    assert chosen["fp32"] < 0.905 and chosen["int8"] > 0.92 and threshold == meta.review_threshold == chosen["int8"]
    for preds in (fp32, int8):
        kept = [p.label == "Benign" for p in preds if p.confidence >= threshold]
        assert sum(kept) >= 0.99 * len(kept)
    assert meta.metrics["val_flagged_low_confidence"] == pytest.approx(sum(c < threshold for c in conf) / 200)
    assert load_bundle(bundle).sha256 == sha  # only bundle.json changed


def test_predictions_that_do_not_match_the_images_are_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(ValueError, match="3 fp32 predictions for 2 validation images"):
        choose_thresholds(bundle, ["Benign", "Pro-B"], {"fp32": [_prediction("Benign", 0.9)] * 3})


def test_the_unfamiliar_check_flags_at_most_5_percent_of_validation_in_every_numerics(tmp_path: Path) -> None:
    """fit chose distance 10 (5 of 100 validation images above it in its own pass); in the
    application's int8 two more images drift just above it (7% flagged).  The bundle must carry a
    threshold that flags at most 5 in both, and say how many foreign images it still catches."""
    bundle = shutil.copytree(make_bundle(tmp_path / "src", ood_threshold=10.0), tmp_path / "b")
    sha = load_bundle(bundle).sha256
    ratios = [0.5 + 0.004 * i for i in range(95)] + [1.2, 1.3, 1.4, 1.5, 1.6]  # score / 10
    fp32 = [_prediction("Benign", 0.99, r) for r in ratios]
    int8 = [_prediction("Benign", 0.99, 1.02 if i in (93, 94) else r) for i, r in enumerate(ratios)]
    foreign = {"fp32": [_prediction("Benign", 0.5, r) for r in (1.01, 3.0, 4.0, 5.0)],
               "int8": [_prediction("Benign", 0.5, r) for r in (1.01, 3.0, 4.0, 5.0)]}
    choose_thresholds(bundle, ["Benign"] * 100, {"fp32": fp32, "int8": int8}, foreign)
    meta = read_meta(bundle)
    assert meta.ood is not None and 10.2 <= meta.ood.threshold < 12.0
    for preds in (fp32, int8):
        assert sum(p.ood_score * 10.0 > meta.ood.threshold for p in preds) <= 5
    assert meta.metrics["val_flagged_ood"] == pytest.approx(0.05)
    assert meta.metrics["ood_dev_flagged"] == pytest.approx(0.75)  # the one just above 10 is now let through
    assert meta.metrics["ood_threshold_by_precision"]["fp32"] < meta.metrics["ood_threshold_by_precision"]["int8"]
    assert load_bundle(bundle).sha256 == sha  # only bundle.json changed

    # Settled again with nothing foreign to measure: fit's choice is never lowered, and no stale
    # catch rate is left behind when the threshold had to rise.
    again = shutil.copytree(make_bundle(tmp_path / "src2", ood_threshold=10.0), tmp_path / "c")
    choose_thresholds(again, ["Benign"] * 100, {"int8": int8})
    assert read_meta(again).ood.threshold > 10.0 and "ood_dev_flagged" not in read_meta(again).metrics
    low = shutil.copytree(make_bundle(tmp_path / "src3", ood_threshold=20.0), tmp_path / "d")
    choose_thresholds(low, ["Benign"] * 100, {"fp32": [_prediction("Benign", 0.99, r / 2) for r in ratios]})
    assert read_meta(low).ood.threshold == 20.0


def test_an_unreadable_foreign_image_is_left_out_not_fatal(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", ood_threshold=10.0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for src in sorted(OOD_DEV.rglob("*.jpg"))[:3]:
        shutil.copy(src, foreign / src.name)
    (foreign / "broken.jpg").write_bytes(b"not a jpeg")
    got = ood_predictions(bundle, foreign, ("fp32",))
    assert [len(v) for v in got.values()] == [3] and all(p.ood_score is not None for p in got["fp32"])
    assert ood_predictions(make_bundle(tmp_path / "plain"), foreign, ("fp32",)) == {}  # no check: nothing to measure


def test_app_predictions_of_an_ensemble_with_tta_average_what_its_members_say(tmp_path: Path, real_images) -> None:
    """bench/review_rule.py judges an ensemble (and TTA) through the application's own classifier:
    the probabilities are the members' averaged, every view of each."""
    from trainer.review_threshold import app_predictions

    a, b = make_bundle(tmp_path / "a", seed=1), make_bundle(tmp_path / "b", seed=2)
    paths = [f for fs in real_images.values() for f in fs][:3]
    root = paths[0].parents[1]
    alone = [app_predictions(m, paths, root, "fp32", workers=1, tta=True) for m in (a, b)]
    both = app_predictions([a, b], paths, root, "fp32", workers=1, tta=True)
    assert [p.model for p in both] == [f"{read_meta(a).name}+{read_meta(b).name}"] * 3
    for i, p in enumerate(both):
        for label, value in p.probabilities.items():
            assert value == pytest.approx((alone[0][i].probabilities[label] + alone[1][i].probabilities[label]) / 2,
                                          abs=1e-5)
    plain = app_predictions(a, paths, root, "fp32", workers=1)
    assert any(abs(p.confidence - q.confidence) > 1e-6 for p, q in zip(plain, alone[0]))  # the views count


def test_choosing_with_the_groups_records_how_often_the_promise_falls_short_on_held_out_halves(tmp_path: Path) -> None:
    """Always right: never short.  Right as often as it says, with errors up to the top: often short."""
    truth = ["Benign"] * 400
    groups = [i // 4 for i in range(400)]
    conf = [0.5 + 0.5 * (i + 1) / 400 for i in range(400)]
    right = make_bundle(tmp_path / "right")
    choose_thresholds(right, truth, {"fp32": [_prediction("Benign", c) for c in conf]}, groups=groups)
    assert read_meta(right).metrics["val_review_short_on_halves"] == {"fp32": 0.0}
    wrong_at_the_top = [_prediction("Pro-B" if i % 50 == 49 else "Benign", c) for i, c in enumerate(conf)]
    shaky = make_bundle(tmp_path / "shaky")
    choose_thresholds(shaky, truth, {"fp32": wrong_at_the_top, "int8": wrong_at_the_top}, groups=groups)
    short = read_meta(shaky).metrics["val_review_short_on_halves"]
    assert set(short) == {"fp32", "int8"} and short["fp32"] == short["int8"] > 0.2
    plain = make_bundle(tmp_path / "plain")
    choose_thresholds(plain, truth, {"fp32": wrong_at_the_top})
    assert "val_review_short_on_halves" not in read_meta(plain).metrics  # without groups: not measured
    choose_thresholds(plain, truth, {"fp32": wrong_at_the_top}, groups=[0] * 400)
    assert "val_review_short_on_halves" not in read_meta(plain).metrics  # one group: nothing to hold out


def test_choosing_names_the_slide_whose_confident_errors_decide_the_shortfall(tmp_path: Path, caplog) -> None:
    """Errors cluster in a slide (a benign slide that looks leukaemic): the data person is told
    which group of validation images decides how often the promise falls short, by file name."""
    groups = [i // 10 for i in range(400)]
    bad = {120, 123, 126}  # three confident errors, all in group 12
    predictions = [replace(_prediction("Pro-B" if i in bad else "Benign", 0.999 if i in bad else 0.6 + i / 1000),
                           file=f"Benign/WBC-Benign-{i:03d}.jpg") for i in range(400)]
    bundle = make_bundle(tmp_path / "b")
    with caplog.at_level("INFO", logger="bcc-train"):
        choose_thresholds(bundle, ["Benign"] * 400, {"fp32": predictions}, groups=groups)
    assert read_meta(bundle).metrics["val_review_deciding_groups"] == {"fp32": [[12, 1.0, 0.0]]}
    assert "Benign/WBC-Benign-120.jpg … Benign/WBC-Benign-129.jpg (10 images) is short on 100%" in caplog.text


def test_with_the_slides_an_image_agreeing_with_its_slide_gets_its_own_cut_off(tmp_path: Path) -> None:
    """400 validation images in slides of ten.  Four confident errors (0.99), each the odd one out
    of its slide: no cut-off catches them, so the one for an image alone flags the least confident
    quarter; the slide's consensus flags them instead, and an agreeing image is held to even odds.
    A slide misread as a whole agrees with itself: then the slide cut-off rises until the images
    it keeps are 99% right again, one error assumed."""
    groups = [i // 10 for i in range(400)]
    odd = {5, 105, 205, 305}
    conf = [0.55 + 0.44 * i / 400 for i in range(400)]
    predictions = [_prediction("Pro-B" if i in odd else "Benign", 0.99 if i in odd else c) for i, c in enumerate(conf)]
    bundle = make_bundle(tmp_path / "b")
    choose_thresholds(bundle, ["Benign"] * 400, {"fp32": predictions}, groups=groups)
    meta = read_meta(bundle)
    assert meta.slide_review_threshold == 0.5 < meta.review_threshold
    assert meta.metrics["val_disagreeing_with_slide"] == 4 / 400
    assert meta.metrics["val_review_short_on_halves_in_slides"] == {"fp32": 0.0}
    assert meta.metrics["val_review_short_on_halves"]["fp32"] > 0.2  # the cut-off alone

    misread = [replace(p, label="Pro-B") if groups[i] == 5 else p for i, p in enumerate(predictions)]
    whole = make_bundle(tmp_path / "whole")
    choose_thresholds(whole, ["Benign"] * 400, {"fp32": misread}, groups=groups)
    cut = read_meta(whole).slide_review_threshold
    kept = [i for i in range(400) if i not in odd and conf[i] >= cut]
    wrong = [i for i in kept if groups[i] == 5]
    assert cut > 0.6 and (len(wrong) + 1) / (len(kept) + 1) <= 0.01  # the promise, one error assumed
    plain = make_bundle(tmp_path / "plain")  # without slides: one cut-off for every image
    choose_thresholds(plain, ["Benign"] * 400, {"fp32": predictions})
    assert read_meta(plain).slide_review_threshold == read_meta(plain).review_threshold
