"""`bcc-train compare`: two real bundles on the same real images, checked against what each
bundle's own `Classifier` says about those images (what `bcc classify` would report)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bcc_desk.bundle import load_bundle
from bcc_desk.classifier import Classifier
from trainer import cli as train_cli
from trainer.compare import mcnemar_exact_p, mcnemar_sentence, too_few_to_tell

from bundles import CLASSES, LABELS, make_bundle

runner = CliRunner()
PIPE_FILE = "[Malignant] Pro-B/slide 3|a.jpg"  # a name that would break a Markdown table unescaped


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_images) -> Path:
    """24 real images in the public data set's class folders, one of them with '|' in its name."""
    root = tmp_path_factory.mktemp("cmp") / "all4 compare"
    for c, files in real_images.items():
        (root / c).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / c / f.name)
    first = sorted((root / CLASSES[3]).glob("*.jpg"))[0]
    first.rename(root / PIPE_FILE)
    return root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    return {
        # Random weights: each of these labels nearly every image as one class, a different one per
        # seed, so the two disagree on many images; B's review threshold flags its less sure ones.
        "a": make_bundle(folder / "a", seed=0, review_threshold=0.999),
        "b": make_bundle(folder / "b", seed=1, review_threshold=0.99),
        # The same classes listed the other way round.
        "reversed": make_bundle(folder / "reversed", seed=2, classes=CLASSES[::-1], review_threshold=0.99),
    }


def _own_predictions(bundle: Path, data: Path) -> dict[str, tuple[str, bool, str]]:
    """file -> (label, needs_review, review_reason), as the application classifies it."""
    paths = sorted(p for p in data.rglob("*.jpg"))
    return {p.file: (p.label, p.needs_review, p.review_reason)
            for p in Classifier(load_bundle(bundle)).predict_paths(paths, data)}


@pytest.fixture(scope="module")
def own(bundles: dict[str, Path], data: Path) -> dict[str, dict[str, tuple[str, bool, str]]]:
    return {key: _own_predictions(path, data) for key, path in bundles.items()}


def _truth(data: Path) -> dict[str, str]:
    """file -> the display name of its class folder."""
    return {p.relative_to(data).as_posix(): LABELS[CLASSES.index(p.parent.name)] for p in data.rglob("*.jpg")}


def _check_model(model: dict, own: dict[str, tuple[str, bool, str]], truth: dict[str, str]) -> None:
    """compare.json's figures for one model are the counts of that bundle's own predictions."""
    assert model["images"] == len(own) == len(truth)
    assert model["label_counts"] == {name: Counter(label for label, _, _ in own.values())[name] for name in LABELS}
    assert model["flagged_count"] == sum(flag for _, flag, _ in own.values())
    assert model["flagged_unfamiliar_count"] == sum("unlike" in reason for _, _, reason in own.values())
    assert model["flagged"] == pytest.approx(model["flagged_count"] / len(own))
    assert model["accuracy"] == pytest.approx(sum(own[f][0] == t for f, t in truth.items()) / len(truth))
    for name in LABELS:
        assert model["per_class"][name]["support"] == sum(t == name for t in truth.values())
        predicted = [f for f, (label, _, _) in own.items() if label == name]
        hits = sum(truth[f] == name for f in predicted)
        assert model["per_class"][name]["precision"] == pytest.approx(hits / len(predicted) if predicted else 0.0)


def test_mcnemar_exact_p_known_values() -> None:
    assert mcnemar_exact_p(0, 6) == pytest.approx(0.03125)  # 2 * 0.5**6
    assert mcnemar_exact_p(6, 0) == pytest.approx(0.03125)
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * 11 / 2**10)  # 2 * (C(10,0) + C(10,1)) / 2**10
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)


def test_the_p_value_is_explained_in_words() -> None:
    text = mcnemar_sentence(0, 6, "old", "new")
    assert "(0 : 6): p = 0.0312." in text and "by chance about 3 times in 100" in text
    assert "new is the more accurate model" in text
    assert "could well be chance" in mcnemar_sentence(4, 2, "old", "new")  # p = 0.69
    assert "p = 1." in mcnemar_sentence(0, 0, "old", "new") and "exactly the same images" in mcnemar_sentence(0, 0, "a", "b")


def test_when_the_images_are_too_few_to_tell_models_apart() -> None:
    assert "Only 5 images have exactly one model right" in too_few_to_tell(400, 5)
    assert "With 120 images, differences of a few points are within chance" in too_few_to_tell(120, 30)
    assert too_few_to_tell(400, 30) == ""  # enough to let McNemar's test speak


def test_compare_counts_equal_each_bundles_own_predictions(bundles, data: Path, own, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    r = runner.invoke(train_cli.app, ["compare", str(bundles["a"]), str(bundles["b"]), str(data), "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    truth = _truth(data)
    a, b = own["a"], own["b"]
    _check_model(report["models"]["a"], a, truth)
    _check_model(report["models"]["b"], b, truth)
    assert report["images"] == 24 and report["classes"] == LABELS and report["part"] == "all"
    assert report["models"]["a"]["sha256"] == load_bundle(bundles["a"]).sha256

    paired = report["paired"]
    assert sum(paired[k] for k in ("both_right", "only_a_right", "only_b_right", "both_wrong")) == 24
    assert paired["only_a_right"] == sum(a[f][0] == t != b[f][0] for f, t in truth.items())
    assert paired["only_b_right"] == sum(b[f][0] == t != a[f][0] for f, t in truth.items())
    assert paired["mcnemar_p"] == pytest.approx(mcnemar_exact_p(paired["only_a_right"], paired["only_b_right"]))

    differ = {f for f in truth if a[f][0] != b[f][0]}
    assert differ, "the two test bundles must disagree somewhere for this test to mean anything"
    assert {d["file"] for d in report["disagreements"]} == differ and len(report["disagreements"]) == len(differ)
    for d in report["disagreements"]:
        f = d["file"]
        assert (d["true"], d["a"]["label"], d["b"]["label"]) == (truth[f], a[f][0], b[f][0])
        assert d["right"] == ("A" if a[f][0] == truth[f] else "B" if b[f][0] == truth[f] else "neither")
    assert report["label_agreement"] == pytest.approx(1 - len(differ) / 24)
    assert {d["file"] for d in report["review_flag_differs"]} == {f for f in truth if a[f][1] != b[f][1]}
    change = report["change"]
    assert change["flagged"] == pytest.approx(report["models"]["b"]["flagged"] - report["models"]["a"]["flagged"])

    md = (out / "compare.md").read_text(encoding="utf-8")
    assert r.output.rstrip().endswith(f"written: {out}")
    assert md.strip() in r.output  # the table printed is the one written
    assert f"({paired['only_a_right']} : {paired['only_b_right']}): p = {paired['mcnemar_p']:.3g}." in md
    assert PIPE_FILE in differ, "the test bundles must disagree on the image with '|' in its name"
    row = next(line for line in md.splitlines() if "slide 3" in line)
    assert "slide 3\\|a.jpg" in row and len(re.findall(r"(?<!\\)\|", row)) == 6  # five cells, '|' escaped
    assert f"### Images the models label differently ({len(differ)})" in md
    # #37: 24 images cannot tell two models apart, and the comparison says so; every figure has its interval
    assert "**Too few images to tell.**" in md and "on 24 images the 95% interval of a 95% accuracy spans" in md
    accuracy = next(line for line in md.splitlines() if "| Accuracy |" in line)
    assert accuracy.count("(") == 2 and report["models"]["a"]["accuracy_ci"][0] <= report["models"]["a"]["accuracy"]


def test_a_bundle_compared_with_itself_agrees_everywhere(bundles, data: Path, own, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default output folder is made in the current directory
    r = runner.invoke(train_cli.app, ["compare", str(bundles["b"]), str(bundles["b"]), str(data)])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "compare-test-convnext_atto-1-vs-test-convnext_atto-1"
    report = json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    assert report["disagreements"] == [] and report["review_flag_differs"] == []
    assert report["paired"]["only_a_right"] == report["paired"]["only_b_right"] == 0
    assert report["paired"]["mcnemar_p"] == 1.0 and report["label_agreement"] == 1.0
    assert report["models"]["a"] == report["models"]["b"]
    _check_model(report["models"]["a"], own["b"], _truth(data))
    md = (folder / "compare.md").read_text(encoding="utf-8")
    assert "p = 1" in md and "### Images the models label differently" not in md


def test_classes_in_another_order_are_matched_by_name(bundles, data: Path, own, tmp_path: Path) -> None:
    r = runner.invoke(train_cli.app, ["compare", str(bundles["a"]), str(bundles["reversed"]), str(data),
                                      "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))
    assert report["b_classes_reordered"] is True and report["classes"] == LABELS
    _check_model(report["models"]["b"], own["reversed"], _truth(data))
    assert "matched to A's by class name" in (tmp_path / "compare.md").read_text(encoding="utf-8")


def test_bundles_with_different_classes_are_a_one_line_error(bundles, data: Path, tmp_path: Path) -> None:
    other = make_bundle(tmp_path / "other", seed=3, classes=["Benign", "Blast", "Lymphoma", "Pro-B"])
    r = runner.invoke(train_cli.app, ["compare", str(bundles["a"]), str(other), str(data), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "different classes" in lines[0], r.output
    assert str(LABELS) in lines[0] and "['Benign', 'Blast', 'Lymphoma', 'Pro-B']" in lines[0]
    assert not (tmp_path / "o").exists()
