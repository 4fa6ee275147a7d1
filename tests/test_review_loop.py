"""The loop a lab closes, end to end on real images: the shipped model classifies a case, a person
reviews it through the app's session, the export is imported into a copy of a data folder, a
model is fine-tuned from the shipped bundle on it, and the two models are compared.  Every step's
output is read back."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import openpyxl
import pytest
from sessions import classified_session
from typer.testing import CliRunner

from bcc_desk import cli as bcc_cli
from bcc_desk.bundle import load_bundle, read_meta
from bcc_desk.files import file_sha256
from bcc_desk.paths import DEFAULT_MODEL_DIR
from bcc_desk.review import ReviewSession
from trainer import cli as train_cli
from trainer.manifest import MANIFEST, MANIFEST_COLUMNS
from trainer.split import Split, make_split

from bundles import CLASSES, LABELS
from folders import class_subset

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m 'not slow'` leaves this module out

runner = CliRunner()
SLIDES = ("patient-7", "patient-8", "patient-9")


@pytest.fixture(scope="module")
def loop(tmp_path_factory, all4: Path) -> dict:
    """Classify, review, export, import, fine-tune: the paths and facts each later check reads."""
    base = tmp_path_factory.mktemp("loop")
    # The lab's data folder (a copy of part of the public data) and the split its model was made with.
    data = class_subset(base / "data", all4, CLASSES, slice(0, 60, 6))
    parent_split = make_split(data, seed=0)
    parent_split.save(base / "parent-split.csv")
    # A case of three slides (patients) of images the data folder does not hold.
    case = base / "case"
    for i, c in enumerate(CLASSES):
        for j, f in enumerate(sorted((all4 / c).glob("*.jpg"))[3::6][:3]):
            (case / SLIDES[(i + j) % 3]).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, case / SLIDES[(i + j) % 3] / f.name)

    session = classified_session(DEFAULT_MODEL_DIR, case)
    # Ten reviews: two corrections (the runner-up class), eight confirmations; two rows left alone.
    reviewed: dict[str, str] = {}
    for row in range(10):
        p = session.prediction(row)
        label = sorted(p.probabilities, key=p.probabilities.get)[-2] if row in (0, 5) else p.label
        session.set_review(row, label, "dr. Ada")
        reviewed[p.file] = label
    workbook, diverted = session.export(base / "review.xlsx")
    assert diverted is None and workbook == base / "review.xlsx"
    before = Counter(c for c in CLASSES for _ in (data / c).iterdir())

    r = runner.invoke(train_cli.app, ["import-reviews", str(workbook), "--into", str(data)])
    assert r.exit_code == 0, r.output
    imported_output = r.output

    run = base / "run"
    r = runner.invoke(train_cli.app, [
        "fit", str(data), "--out", str(run), "--init-bundle", str(DEFAULT_MODEL_DIR), "--split", str(base / "parent-split.csv"),
        "--epochs", "1", "--batch-size", "8", "--workers", "2", "--no-int8", "--no-shift-table", "--device", "cpu", "--name", "lab-ft-1",
        "--cv", "0",
    ])
    # Ten images a class: too few to measure the model, which the trainer says (exit code 4), and the
    # bundle runs in bcc-desk only when told to.
    assert r.exit_code == train_cli.EXIT_NOT_VALIDATED and "NOT VALIDATED" in r.output, r.output
    return {"base": base, "data": data, "case": case, "workbook": workbook, "reviewed": reviewed, "before": before,
            "session": session, "imported_output": imported_output, "run": run, "parent_split": parent_split}


def _manifest(data: Path) -> list[dict[str, str]]:
    with open(data / MANIFEST, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_import_adds_every_reviewed_image_once_with_its_manifest_row(loop: dict) -> None:
    data, reviewed, session = loop["data"], loop["reviewed"], loop["session"]
    rows = _manifest(data)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert sorted(r["file"] for r in rows) == sorted(reviewed)
    folder_of = dict(zip(LABELS, CLASSES, strict=True))
    parent = load_bundle(DEFAULT_MODEL_DIR)
    for r in rows:
        image = data / r["path"]
        # In the reviewer's class (the data set's own folder for that label), byte for byte the original.
        assert r["reviewer_label"] == reviewed[r["file"]] and r["class"] == folder_of[r["reviewer_label"]]
        assert image.parent == data / r["class"] and file_sha256(image) == r["sha256"] == file_sha256(loop["case"] / r["file"])
        p = session.prediction(session.find(r["file"]))
        assert r["model_label"] == p.label and r["slide"] == p.slide and r["reviewed_by"] == "dr. Ada"
        assert r["source"] == "review.xlsx" and r["source_sha256"] == file_sha256(loop["workbook"])
        assert r["model_sha256"] == parent.sha256 and r["reviewed_at"]
    after = Counter(c for c in CLASSES for _ in (data / c).iterdir())
    assert after - loop["before"] == Counter(folder_of[label] for label in reviewed.values())
    corrections = sum(r["model_label"] != r["reviewer_label"] for r in rows)
    assert corrections == 2
    out = loop["imported_output"]
    assert "10 images added" in out and "2 rows without a reviewer label skipped" in out
    # The originals are untouched and the case folder holds nothing new.
    assert sorted(p.name for p in loop["case"].rglob("*") if p.is_file()) == sorted(Path(f).name for f in session_files(session))

    # Importing the same workbook again adds nothing.
    r = runner.invoke(train_cli.app, ["import-reviews", str(loop["workbook"]), "--into", str(data)])
    assert r.exit_code == 0 and "0 images added" in r.output and "already there" in r.output, r.output
    assert len(_manifest(data)) == 10 and Counter(c for c in CLASSES for _ in (data / c).iterdir()) == after


def session_files(session: ReviewSession) -> list[str]:
    return [p.file for p in session.predictions()]


def test_the_fine_tuned_split_keeps_the_parents_parts_and_each_slide_on_one_side(loop: dict) -> None:
    split = Split.load(loop["run"] / "split.csv", loop["data"])
    part = {r.path: r.split for r in split.rows}
    assert all(part[r.path] == r.split for r in loop["parent_split"].rows)  # nothing the parent judged on moved
    slide_parts: dict[str, set[str]] = {}
    for r in _manifest(loop["data"]):
        slide_parts.setdefault(r["slide"], set()).add(part[r["path"]])
    assert set(slide_parts) == set(SLIDES) and all(len(parts) == 1 for parts in slide_parts.values())
    # #37: the lab's slides are dealt like any images, so its reviews also judge the model (validation, test)
    assert set().union(*slide_parts.values()) == {"train", "val", "test"}


def test_the_fine_tuned_bundle_names_its_parent_and_the_reviews(loop: dict) -> None:
    parent = load_bundle(DEFAULT_MODEL_DIR)
    child = load_bundle(loop["run"] / "bundle")
    meta = child.meta
    assert meta.name == "lab-ft-1" and meta.classes == parent.classes and meta.labels == parent.labels
    assert meta.input == parent.meta.input and meta.provenance["init"] == f"bundle:{parent.name}"
    # The chain: the workbook's model is the parent this bundle names.
    wb = openpyxl.load_workbook(loop["workbook"], read_only=True)
    run = {row[0]: row[1] for row in wb["Run"].iter_rows(min_row=2, values_only=True)}
    wb.close()
    assert meta.provenance["parent"] == {"name": parent.name, "sha256": parent.sha256} and run["model sha256"] == parent.sha256
    (book,) = meta.provenance["reviews"]
    assert book["workbook"] == "review.xlsx" and book["sha256"] == file_sha256(loop["workbook"])
    assert sum(book["images"].values()) == 10 and book["model"] == parent.name
    assert meta.provenance["recipe"]["recipe"] == "finetune" and meta.provenance["recipe"]["lr"] == 1e-4
    info = runner.invoke(bcc_cli.app, ["info", str(loop["run"] / "bundle")], env={"COLUMNS": "250"}).output
    assert "fine-tuned from" in info and f"{parent.name} (weights sha256 {parent.sha256[:16]}" in info
    assert "10 reviewed images of review.xlsx" in info
    # The desktop app's model dialog says the same.
    from bcc_desk.gui.model_dialog import describe_html

    details = describe_html(read_meta(loop["run"] / "bundle"), loop["run"] / "bundle")
    assert f"fine-tuned from</b></td><td>{parent.name} (weights sha256 {parent.sha256[:16]}" in details
    assert "learned from</b></td><td>10 reviewed images of review.xlsx" in details
    assert read_meta(loop["run"] / "bundle").weights_sha256 == child.sha256


def test_compare_reads_both_models_on_the_same_images(loop: dict) -> None:
    out = loop["base"] / "compare"
    child = loop["run"] / "bundle"
    r = runner.invoke(train_cli.app, ["compare", str(DEFAULT_MODEL_DIR), str(child), str(loop["data"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").read_text().strip()
    # The comparison's counts agree with each model's own bcc classify report on the same images.
    # Without a split it judges each image alone (the class folders must not act as slides), as
    # bcc classify does with the slide's consensus off.
    for key, bundle in (("a", DEFAULT_MODEL_DIR), ("b", child)):
        report = loop["base"] / f"report-{key}.xlsx"
        r = runner.invoke(bcc_cli.app, ["classify", str(loop["data"]), "-m", str(bundle), "-o", str(report), "--device", "cpu",
                                        "--no-slide-consensus", "--allow-unvalidated"])
        assert r.exit_code == 0, r.output
        wb = openpyxl.load_workbook(report, read_only=True)
        rows = list(wb["Images"].iter_rows(values_only=True))
        wb.close()
        col = {name: i for i, name in enumerate(rows[0])}
        labels = Counter(row[col["label"]] for row in rows[1:])
        flagged = sum(bool(row[col["needs_review"]]) for row in rows[1:])
        model = result["models"][key]
        assert model["images"] == len(rows) - 1
        assert {k: v for k, v in model["label_counts"].items() if v} == dict(labels)
        assert model["flagged_count"] == flagged
