"""The shipped default model: verified, runs the README's main job, and knows what it wasn't trained on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openpyxl

from bcc_desk.bundle import load_bundle
from bcc_desk.classifier import Classifier
from bcc_desk.images import discover_images
from bcc_desk.paths import DEFAULT_MODEL_DIR, SAMPLES_DIR

from conftest import CLASSES, LABELS, OOD_DEV, REPO


def test_the_default_bundle_verifies_and_is_calibrated() -> None:
    bundle = load_bundle(DEFAULT_MODEL_DIR)
    meta = bundle.meta
    assert meta.arch == "convnext_tiny" and meta.classes == CLASSES and meta.input.size == 160
    assert meta.ood is not None and bundle.model.has_ood
    assert meta.metrics["val_ece_after"] <= meta.metrics["val_ece_before"]
    assert meta.metrics["val_flagged_ood"] <= 0.05 and meta.metrics["ood_dev_flagged"] >= 0.95


def test_bcc_info_shows_the_test_figures_the_readme_quotes() -> None:
    from typer.testing import CliRunner

    from bcc_desk.cli import app

    meta = load_bundle(DEFAULT_MODEL_DIR).meta
    assert meta.labels == LABELS and meta.metrics["test_images"] >= 400
    out = CliRunner().invoke(app, ["info", str(DEFAULT_MODEL_DIR)], env={"COLUMNS": "200"}).output
    assert f"{meta.metrics['test_accuracy']:.4g}" in out and "test_recall" in out
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"{meta.metrics['test_accuracy']:.1%}" in readme  # the README quotes what the bundle carries
    assert f"{meta.metrics['test_flagged']:.1%} flagged" in readme
    # The review flag's two cut-offs: one for an image alone, one for an image its slide agrees with.
    assert meta.slide_review_threshold is not None and 0.5 <= meta.slide_review_threshold <= meta.review_threshold
    assert "agreeing with its slide" in out


def test_readme_main_job_classifies_the_samples(tmp_path: Path) -> None:
    """`bcc classify resources/samples` with no --model, as the Quick start runs it."""
    out = tmp_path / "samples-report.xlsx"
    proc = subprocess.run([sys.executable, "-m", "bcc_desk", "classify", str(SAMPLES_DIR), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    ws = openpyxl.load_workbook(out)["Images"]
    header = [c.value for c in ws[1]]
    rows = [dict(zip(header, r)) for r in ws.iter_rows(min_row=2, values_only=True)]
    assert len(rows) == 12 and not any(r["error"] for r in rows)
    assert {r["slide"] for r in rows} == set(LABELS)  # one name per class: folders and labels alike
    wrong = [r["file"] for r in rows if r["label"] != r["slide"]]
    assert not wrong, f"samples labelled wrongly: {wrong}"


def test_images_from_another_lab_are_flagged_as_unfamiliar() -> None:
    """The 60 ood-dev cells (another lab, stain and microscope) must not pass as confident subtypes."""
    paths = discover_images(OOD_DEV)
    preds = list(Classifier(load_bundle(DEFAULT_MODEL_DIR)).predict_paths(paths, OOD_DEV))
    unfamiliar = sum("unlike training data" in p.review_reason for p in preds)
    assert len(preds) == 60 and unfamiliar >= 0.95 * len(preds)
