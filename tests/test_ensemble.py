"""`bcc-train ensemble`: two trained bundles become one, with its own calibration and thresholds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bcc_desk import cli as bcc_cli
from bcc_desk.bundle import load_bundle, read_meta
from bcc_desk.classifier import Classifier
from trainer import cli as train_cli
from trainer.split import Split, make_split

from bundles import CLASSES, make_bundle
from conftest import OOD_DEV
from folders import class_subset

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m 'not slow'` leaves this module out

runner = CliRunner()
NOT_VALIDATED = train_cli.EXIT_NOT_VALIDATED  # tiny members and their pack: never fit for use
TINY = ["--arch", "convnext_atto", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
        "--hidden", "32", "--workers", "2", "--no-int8", "--cv", "0"]


@pytest.fixture(scope="module")
def members(tmp_path_factory, all4: Path) -> tuple[Path, Path, Path, Path]:
    """Data, its split and two bundles trained on that split with different seeds."""
    base = tmp_path_factory.mktemp("ens")
    data = class_subset(base / "all4-small", all4, CLASSES, slice(0, 72, 6))
    runs = []
    for seed in (0, 1):
        run = base / f"run{seed}"
        split = [] if not runs else ["--split", str(runs[0] / "split.csv")]
        r = runner.invoke(train_cli.app, ["fit", str(data), "--out", str(run), *TINY, "--seed", str(seed), *split])
        assert r.exit_code == NOT_VALIDATED, r.output
        runs.append(run)
    return data, runs[0] / "split.csv", runs[0] / "bundle", runs[1] / "bundle"


def _ensemble(members, out: Path, *extra: str):
    data, split, a, b = members
    return runner.invoke(train_cli.app, ["ensemble", str(a), str(b), "--data", str(data), "--split", str(split),
                                         "--out", str(out), *extra])


def _answers(ens, member_dirs, data: Path, split_csv: Path):
    """For six validation images: the ensemble's prediction, each member's alone, and what the
    ensemble should answer (the members' probabilities averaged, then its own temperature)."""
    images = [data / p for p in Split.load(split_csv, data).paths("val")][:6]
    mine = Classifier(ens, precision="fp32", compile=False).predict_paths(images, data)
    theirs = [list(Classifier(load_bundle(m), precision="fp32", compile=False).predict_paths(images, data))
              for m in member_dirs]
    for p, *alone in zip(mine, *theirs):
        mean = torch.stack([torch.tensor(list(q.probabilities.values())) for q in alone]).mean(0)
        yield p, *alone, torch.softmax(mean.log() / ens.meta.temperature, 0)


def test_the_ensemble_is_one_bundle_that_averages_its_members_and_flags_by_its_own_thresholds(
    members, tmp_path: Path
) -> None:
    data, split_csv, a, b = members
    out = tmp_path / "ens"
    # One training epoch leaves near-even probabilities, which int8 cannot match: that is the next test's.
    r = _ensemble(members, out, "--name", "two-atto", "--ood-dir", str(OOD_DEV), "--no-int8")
    assert r.exit_code == NOT_VALIDATED, r.output
    assert "ensemble two-atto written" in r.output

    ens = load_bundle(out)  # verified like any bundle: sha256 and every shape
    meta, ma, mb = ens.meta, read_meta(a), read_meta(b)
    assert [m["name"] for m in meta.members] == [ma.name, mb.name]
    assert [m["weights_sha256"] for m in meta.members] == [ma.weights_sha256, mb.weights_sha256]
    assert meta.provenance["split_sha256"] == ma.provenance["split_sha256"]
    # Its own temperature and review threshold, chosen on the application's validation predictions.
    assert meta.temperature != 1.0 and "val_ece_after" in meta.metrics
    assert meta.review_threshold == meta.metrics["review_threshold_by_precision"]["fp32"]
    assert meta.ood is not None and "ood_dev_flagged" in meta.metrics and meta.metrics["val_flagged_ood"] <= 0.05
    # The colour check profiled again for the pack, its cut-off chosen under every shift.
    assert meta.colour is not None and "shift" in meta.metrics

    shown = runner.invoke(bcc_cli.app, ["info", str(out)], env={"COLUMNS": "200"}).output
    assert shown.count("ensemble member") == 2 and all(m.weights_sha256[:16] in shown for m in (ma, mb))
    # The desktop app's model dialog describes it in the same rows, not as a raw list of members.
    from bcc_desk.gui.model_dialog import describe_html

    html = describe_html(meta, out)
    assert html.count("ensemble member") == 2 and all(m.weights_sha256[:16] in html for m in (ma, mb))
    assert "provenance: members" not in html and "provenance: members" not in shown

    # What it answers: the members' calibrated probabilities averaged, then its own temperature;
    # its unfamiliarity: the sum of the members' distances (block-diagonal statistics).
    for p, pa, pb, expected in _answers(ens, (a, b), data, split_csv):
        assert torch.tensor(list(p.probabilities.values())) == pytest.approx(expected, abs=1e-4)
        assert p.needs_review == (p.confidence < meta.review_threshold or p.ood_score > 1 or p.colour_score > 1)
        summed = pa.ood_score * ma.ood.threshold + pb.ood_score * mb.ood.threshold
        # the sum bounds the nearest class of the pair from below; equal when both are nearest to one class
        assert p.ood_score * meta.ood.threshold >= summed * (1 - 1e-4)


def test_a_member_trained_at_a_smaller_size_sees_the_image_at_its_own_size(members, tmp_path: Path) -> None:
    """A 160-px network packs with a 224-px one: the bundle decodes at the larger size and the
    smaller member gets the image resized to its own, so it answers as it does alone."""
    data, split_csv, a, _ = members
    small = tmp_path / "small"
    r = runner.invoke(train_cli.app, ["fit", str(data), "--out", str(small), *TINY, "--image-size", "48",
                                      "--seed", "2", "--split", str(split_csv)])  # the last --image-size wins
    assert r.exit_code == NOT_VALIDATED, r.output
    out = tmp_path / "ens"
    r = _ensemble((data, split_csv, a, small / "bundle"), out, "--no-int8")
    assert r.exit_code == NOT_VALIDATED, r.output
    ens = load_bundle(out)
    assert ens.meta.input.size == 64 and [m.get("size") for m in ens.meta.members] == [None, 48]

    for p, _, _, expected in _answers(ens, (a, small / "bundle"), data, split_csv):
        # Pillow resizes the original once, the ensemble twice (to 64, then to 48): close, not equal.
        assert torch.tensor(list(p.probabilities.values())) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("problem", ["other split", "ensemble member", "other classes", "same weights", "not empty"])
def test_members_that_cannot_be_averaged_honestly_are_one_line_errors(members, tmp_path: Path, problem: str) -> None:
    data, split_csv, a, b = members
    out = tmp_path / "ens"
    if problem == "other split":
        b = shutil.copytree(b, tmp_path / "b")
        meta = json.loads((b / "bundle.json").read_text())
        meta["provenance"]["split_sha256"] = "0" * 64
        (b / "bundle.json").write_text(json.dumps(meta))
        expected = "was not trained on the split"
    elif problem == "ensemble member":
        r = _ensemble(members, tmp_path / "inner", "--no-int8")
        assert r.exit_code == NOT_VALIDATED, r.output
        b = tmp_path / "inner"
        expected = "is an ensemble already"
    elif problem == "other classes":
        b = shutil.copytree(b, tmp_path / "b")
        meta = json.loads((b / "bundle.json").read_text())
        meta["display_names"] = ["Healthy", "early Pre-B", "Pre-B", "Pro-B"]
        (b / "bundle.json").write_text(json.dumps(meta))
        expected = "differ in their class names"
    elif problem == "same weights":
        b = shutil.copytree(a, tmp_path / "a-again")
        expected = "has the same weights as"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "is not an empty folder"
    r = _ensemble((data, split_csv, a, b), out, "--no-int8")
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.output
    if problem == "not empty":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def test_an_ensemble_runs_as_static_int8_with_the_same_labels(tmp_path: Path, all4: Path) -> None:
    """The int8 path exports the whole ensemble as one network (both members' heads and last
    stages kept in floating point); its labels on validation must match fp32's."""
    data = class_subset(tmp_path / "data", all4, CLASSES, slice(0, 40, 2))
    split = make_split(data, seed=0)
    split.save(tmp_path / "split.csv")
    folders = []
    for seed, size in ((0, 64), (1, 48)):  # one member at another size: the resize is in the exported graph
        folder = make_bundle(tmp_path / f"m{seed}", seed=seed, size=size, hidden=[32])
        meta = json.loads((folder / "bundle.json").read_text())
        meta["provenance"]["split_sha256"] = split.sha256()  # as if fit had trained it on this split
        (folder / "bundle.json").write_text(json.dumps(meta))
        folders.append(folder)
    out = tmp_path / "ens"
    r = _ensemble((data, tmp_path / "split.csv", *folders), out)
    assert r.exit_code == NOT_VALIDATED, r.output
    assert "int8 added" in r.output
    meta = read_meta(out)
    assert meta.input.size == 64 and meta.members[1]["size"] == 48
    assert meta.int8 is not None and meta.int8.check["passed"] and meta.int8.check["label_agreement"] >= 0.98
    chosen = meta.metrics["review_threshold_by_precision"]
    assert set(chosen) == {"fp32", "int8"} and meta.review_threshold == max(chosen.values())
    images = [data / p for p in split.paths("val")]
    fp32 = Classifier(load_bundle(out), precision="fp32", compile=False).predict_paths(images, data)
    int8 = Classifier(load_bundle(out), precision="int8")  # the package the trainer's check built and kept
    assert [p.label for p in int8.predict_paths(images, data)] == [p.label for p in fp32] and int8.int8_active
