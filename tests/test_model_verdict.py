"""The trainer's verdict on a bundle (#37): fit for use only where validation could measure the
model and it passed; a bundle that is not validated runs only when told to, and says so."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import openpyxl
import pytest
from pypdf import PdfReader
from typer.testing import CliRunner

from bcc_desk import cli
from bcc_desk.bundle import Verdict, read_meta, record_verdict
from bcc_desk.bundle_meta import describe
from bcc_desk.paths import DEFAULT_MODEL_DIR
from bcc_desk.stats import wilson_interval
from trainer import cli as train_cli
from trainer.split import make_split
from trainer.verdict import ACCURACY_FLOOR, MIN_VAL_PER_CLASS, judge

from bundles import make_bundle
from folders import slide_folders

runner = CliRunner()


@pytest.fixture(scope="module")
def shipped():
    return read_meta(DEFAULT_MODEL_DIR)


def val_of(meta, per_class: int) -> list[str]:
    return [c for c in meta.classes for _ in range(per_class)]


def test_the_shipped_model_is_fit_for_use_and_says_why(shipped) -> None:
    assert shipped.verdict is not None and shipped.verdict.fit_for_use and shipped.verdict.reasons == []
    assert judge(shipped, val_of(shipped, 100)) == shipped.verdict
    assert f"at least {MIN_VAL_PER_CLASS} images of every class" in shipped.verdict.rule
    # bcc info and the model dialog: each accuracy with its n and 95% interval (Wilson's)
    rows = dict(describe(shipped))
    n = shipped.metrics["val_images"]
    assert n == sum(shipped.metrics["val_per_class"].values()) == 411
    lo, hi = wilson_interval(round(shipped.metrics["val_accuracy"] * n), n)
    assert rows["validation accuracy"] == f"{shipped.metrics['val_accuracy']:.1%} of 411 images (95% CI {lo:.1%}-{hi:.1%})"
    assert rows["test accuracy"].startswith(f"{shipped.metrics['test_accuracy']:.1%} of 406 images (95% CI ")
    assert rows["verdict"] == "fit for use"


def test_each_failing_condition_is_named(shipped) -> None:
    small = judge(shipped, [*val_of(shipped, 30)[: -30], *[shipped.classes[-1]] * 3])
    assert not small.fit_for_use and small.reasons[0].startswith("validation too small to measure it (Pro-B: 3 images")
    weak = judge(dataclasses.replace(shipped, metrics={**shipped.metrics, "val_accuracy": 0.86}), val_of(shipped, 25))
    assert not weak.fit_for_use and f"under the floor of {ACCURACY_FLOOR:.0%}" in weak.reasons[0]  # 86 of 100: CI from 77.9%
    # The trainer's old "least confident quarter" fallback: a quarter flagged, the rest not 99% right.
    fallback = {**shipped.metrics, "val_accuracy_unflagged": {"fp32": 0.93, "int8": 0.94}, "val_flagged_low_confidence": 0.25}
    broken = judge(dataclasses.replace(shipped, metrics=fallback), val_of(shipped, 100))
    assert broken.reasons == ["the review promise does not hold on validation: unflagged 93.0% (fp32), 94.0% (int8) right "
                              "with 25% flagged (at least 99% right with at most 25% flagged needed)"]
    assert broken.text.startswith("NOT VALIDATED: the review promise")
    # Fewer than 99 validation images can never show the promise: the reason says so.
    short = judge(dataclasses.replace(shipped, metrics=fallback), val_of(shipped, 20))
    assert short.reasons[-1].endswith("; 80 validation images cannot show it: counting one assumed error, at least 99 "
                                      "must be left unflagged")
    bare = judge(dataclasses.replace(shipped, metrics={}), val_of(shipped, 100))
    assert bare.reasons == ["no validation accuracy recorded", "no review promise recorded on validation"]


def test_bcc_train_verdict_records_it_and_exits_4_when_not_validated(tmp_path: Path, all4: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(DEFAULT_MODEL_DIR / "bundle.json", bundle)  # the verdict reads bundle.json alone
    split = make_split(all4, val=0.1, test=0.1).save(tmp_path / "split.csv")  # 7-9 validation images a class
    r = runner.invoke(train_cli.app, ["verdict", str(bundle), str(all4), "--split", str(split)])
    assert r.exit_code == 4, r.output
    assert "NOT VALIDATED" in r.output and "validation too small to measure it" in r.output
    assert read_meta(bundle).verdict.fit_for_use is False
    split = make_split(all4, val=0.4, test=0.1).save(tmp_path / "split.csv")  # 30-36 a class
    r = runner.invoke(train_cli.app, ["verdict", str(bundle), str(all4), "--split", str(split)])
    assert r.exit_code == 0 and "verdict: fit for use" in r.output, r.output
    assert read_meta(bundle).verdict.fit_for_use is True


def test_a_model_not_validated_runs_only_when_told_and_every_page_says_so(tmp_path: Path, real_images) -> None:
    model = make_bundle(tmp_path / "weak")
    record_verdict(model, Verdict(False, ["validation too small to measure it (Benign: 3 images)"], "the rule"))
    root = slide_folders(tmp_path / "lab", real_images, 3, ("slide-1", "slide-2"), empty_file=False)
    out = tmp_path / "r.xlsx"
    r = runner.invoke(cli.app, ["classify", str(root), "-m", str(model), "-o", str(out), "--pdf"])
    assert r.exit_code == 2 and "is not validated (validation too small" in r.output and "--allow-unvalidated" in r.output
    assert not out.exists()
    r = runner.invoke(cli.app, ["classify", str(root), "-m", str(model), "-o", str(out), "--pdf", "--allow-unvalidated"])
    assert r.exit_code == 0, r.output
    wb = openpyxl.load_workbook(out)
    run = {row[0]: row[1] for row in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert run["model verdict"].startswith("NOT VALIDATED: validation too small")
    for ws in wb.worksheets:
        assert ws.oddHeader.left.text.startswith("MODEL NOT VALIDATED"), ws.title
    for page in PdfReader(out.with_suffix(".pdf")).pages:
        assert "MODEL NOT VALIDATED" in page.extract_text()
    # A bundle from before verdicts runs as before, and its report says the verdict is not recorded.
    old = make_bundle(tmp_path / "old")
    r = runner.invoke(cli.app, ["classify", str(root), "-m", str(old), "-o", str(out)])
    assert r.exit_code == 0, r.output
    run = {row[0]: row[1] for row in openpyxl.load_workbook(out)["Run"].iter_rows(min_row=2, values_only=True)}
    assert run["model verdict"] == "not recorded (a bundle from before verdicts)"
    assert openpyxl.load_workbook(out)["Images"].oddHeader.left.text is None


@pytest.mark.slow
def test_a_fine_tune_measured_on_enough_images_is_fit_for_use(tmp_path: Path, all4: Path, real_images) -> None:
    """The other side of the rule, measured end to end: the shipped model fine-tuned on the
    committed subset (one gentle epoch on 15 images a class) with 141 validation images, where its
    promise can hold. Its verdict rests on the figures this run measured; fit exits 0.  In fp32
    and without the shift table (the verdict rests on neither; test_trainer covers both): about a
    sixth of the time."""
    split = make_split(all4, val=0.45, test=0.05).save(tmp_path / "split.csv")
    run = tmp_path / "run"
    r = runner.invoke(train_cli.app, ["fit", str(all4), "--out", str(run), "--init-bundle", str(DEFAULT_MODEL_DIR),
                                      "--split", str(split), "--epochs", "1", "--lr", "1e-6", "--limit-per-class", "15", "--cv", "0",
                                      "--workers", "2", "--no-shift-table", "--no-int8"])
    assert r.exit_code == 0, r.output
    meta = read_meta(run / "bundle")
    # --no-shift-table: the verdict does not wait for the shift table; the colour check keeps its
    # starting cut-off, and the log says how to choose it later.
    assert "shift" not in meta.metrics and meta.colour is not None and "bcc-train colour-check" in r.output
    assert dict(describe(meta))["training colours"].endswith("cut-off not chosen under shifts yet (`bcc-train colour-check`)")
    assert meta.verdict is not None and meta.verdict.fit_for_use and meta.verdict.reasons == [], meta.verdict
    assert min(meta.metrics["val_per_class"].values()) >= MIN_VAL_PER_CLASS
    n = meta.metrics["val_images"]
    assert wilson_interval(round(meta.metrics["val_accuracy"] * n), n)[0] >= ACCURACY_FLOOR
    assert min(meta.metrics["val_accuracy_unflagged"].values()) >= 0.99 and meta.metrics["val_flagged_low_confidence"] <= 0.25
    assert "NOT VALIDATED" not in r.output and "verdict: fit for use" in r.output
    # bcc classify runs it without being told
    root = slide_folders(tmp_path / "lab", real_images, 2, ("slide-1",), empty_file=False)
    out = tmp_path / "r.xlsx"
    r = runner.invoke(cli.app, ["classify", str(root), "-m", str(run / "bundle"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    run_sheet = {row[0]: row[1] for row in openpyxl.load_workbook(out)["Run"].iter_rows(min_row=2, values_only=True)}
    assert run_sheet["model verdict"] == "fit for use"
