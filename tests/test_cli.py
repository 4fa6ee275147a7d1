"""`bcc classify` and `bcc info` as a user runs them: real folders, real bundles, xlsx read back."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import openpyxl
import pytest
from typer.testing import CliRunner

from bcc_desk import cli
from bcc_desk.images import discover_images
from bcc_desk.prediction import REVIEW_DISAGREES
from bcc_desk.slides import disagrees_with_slide

from bundles import LABELS, make_bundle
from corpus import build_corpus
from folders import slide_folders

runner = CliRunner()
IMAGE_HEADER = ["file", "slide", "patient_id", "label", "confidence", "needs_review", "review_reason", "error",
                *(f"p: {c}" for c in LABELS), "margin"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("m") / "atto", review_threshold=0.6)


@pytest.fixture()
def lab_folder(tmp_path: Path, real_images) -> Path:
    """What a lab exports: a folder per slide, plus every kind of bad input in one of them."""
    root = slide_folders(tmp_path / "export", real_images, 3, ("slide-1", "slide-2"), empty_file=False)
    build_corpus(root / "odd", [f for files in real_images.values() for f in files])
    return root


def _rows(ws) -> list[dict]:
    header = [c.value for c in ws[1]]
    return [dict(zip(header, (c.value for c in row))) for row in ws.iter_rows(min_row=2)]


def test_classify_writes_a_complete_workbook(model: Path, lab_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.xlsx"
    result = runner.invoke(cli.app, ["classify", str(lab_folder), "--model", str(model), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Report:" in result.output and "unreadable" in result.output
    wb = openpyxl.load_workbook(out)
    assert wb.sheetnames == ["Images", "Slides", "Run"]
    images = wb["Images"]
    assert [c.value for c in images[1]][: len(IMAGE_HEADER)] == IMAGE_HEADER
    rows = _rows(images)
    discovered = {p.relative_to(lab_folder).as_posix() for p in discover_images(lab_folder)}
    assert {r["file"] for r in rows} == discovered
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(good) >= 20 and len(bad) >= 5
    # A label other than most of its slide's is flagged too (the slide's consensus, on by default).
    disagree = dict(zip((r["file"] for r in good),
                        disagrees_with_slide([r["slide"] for r in good], [r["label"] for r in good]), strict=True))
    for r in good:
        assert r["label"] in LABELS
        assert r["slide"] == r["file"].rsplit("/", 1)[0]
        assert sum(r[f"p: {c}"] for c in LABELS) == pytest.approx(1.0, abs=1e-4)
        assert (REVIEW_DISAGREES in (r["review_reason"] or "")) == disagree[r["file"]]
        assert r["needs_review"] == (r["confidence"] < 0.6 or disagree[r["file"]])
        assert r["model"] == "test-convnext_atto-0" and len(r["model_sha256"]) == 64
    for r in bad:
        assert r["label"] is None and "\n" not in r["error"]
        assert r["needs_review"] is True  # a person must look at what could not be read
    formula_names = [r for r in rows if r["file"].split("/")[-1].startswith(("=", "+", "-", "@"))]
    assert formula_names, "the corpus has formula-like names"
    slides = _rows(wb["Slides"])
    assert {s["slide"] for s in slides} >= {"slide-1", "slide-2"}
    run = {r[0].value: r[1].value for r in wb["Run"].iter_rows()}
    assert any("test-convnext_atto-0" in str(v) for v in run.values())


def test_csv_and_single_image(model: Path, lab_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = runner.invoke(cli.app, ["classify", str(lab_folder / "slide-1"), "-m", str(model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8-sig")
    assert text.splitlines()[0].startswith("file,slide,patient_id,label,confidence")
    assert len(text.splitlines()) == 1 + 6
    one = next((lab_folder / "slide-1").glob("*.jpg"))
    result = runner.invoke(cli.app, ["classify", str(one), "-m", str(model), "--csv", "-o", str(tmp_path / "one.csv")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "one.csv").read_text(encoding="utf-8-sig").splitlines()) == 2


def test_default_report_lands_in_root(model: Path, lab_folder: Path) -> None:
    result = runner.invoke(cli.app, ["classify", str(lab_folder / "slide-2"), "-m", str(model), "-q"])
    assert result.exit_code == 0, result.output
    assert (lab_folder / "slide-2" / "bcc-report.xlsx").is_file()


def test_usage_errors_are_one_line_and_exit_2(model: Path, lab_folder: Path, tmp_path: Path, monkeypatch) -> None:
    def run(*args: str):
        r = runner.invoke(cli.app, list(args))
        return r.exit_code, r.output.strip()

    code, msg = run("classify", str(tmp_path / "missing"), "-m", str(model))
    assert code == 2 and msg.count("\n") == 0 and "does not exist" in msg
    broken = tmp_path / "broken"
    broken.mkdir()
    code, msg = run("classify", str(lab_folder), "-m", str(broken))
    assert code == 2 and "has no bundle.json" in msg and "Traceback" not in msg
    code, msg = run("classify", str(lab_folder), "-m", str(model), "--device", "cuda")
    if not __import__("torch").cuda.is_available():
        assert code == 2 and "no CUDA GPU" in msg
    code, msg = run("classify", str(lab_folder), "-m", str(model), "-o", str(tmp_path / "nope" / "r.xlsx"))
    assert code == 2 and "does not exist" in msg
    # A folder nobody can write in (even root: /proc) is refused before any image is classified.
    code, msg = run("classify", str(lab_folder), "-m", str(model), "-o", "/proc/report.xlsx")
    assert code == 2 and "cannot write the report in /proc" in msg and "--out" in msg
    monkeypatch.setattr(cli, "DEFAULT_MODEL_DIR", tmp_path / "no-default")
    code, msg = run("classify", str(lab_folder))
    assert code == 2 and "no default model" in msg and "bcc-train fit" in msg and msg.count("\n") <= 1


def test_nothing_classified_exits_1(model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    r = runner.invoke(cli.app, ["classify", str(empty), "-m", str(model)])
    assert r.exit_code == 1 and "no images found" in r.output
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"")
    (junk / "b.png").write_bytes(os.urandom(500))
    r = runner.invoke(cli.app, ["classify", str(junk), "-m", str(model), "-o", str(tmp_path / "j.xlsx")])
    assert r.exit_code == 1 and "no image could be classified" in r.output
    assert len(_rows(openpyxl.load_workbook(tmp_path / "j.xlsx")["Images"])) == 2  # the report still lists them


def test_info_shows_metadata(model: Path) -> None:
    r = runner.invoke(cli.app, ["info", str(model)])
    assert r.exit_code == 0, r.output
    for text in ("convnext_atto", "[Malignant] Pro-B", "review threshold", "0.600", "val_macro_f1"):
        assert text in r.output


def test_python_m_entry_point_runs_for_real(model: Path, lab_folder: Path, tmp_path: Path) -> None:
    """A fresh process, as a technician runs it: exit code and the closing summary."""
    out = tmp_path / "real.xlsx"
    proc = subprocess.run(
        [sys.executable, "-m", "bcc_desk", "classify", str(lab_folder / "slide-1"), "-m", str(model), "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "slide-1" in proc.stdout and "6 of 6 images classified" in proc.stdout
    assert out.is_file()
    proc = subprocess.run([sys.executable, "-m", "bcc_desk", "classify", "--batch-size", "0", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2


def test_the_console_summary_fits_80_columns_in_natural_slide_order(model: Path, tmp_path: Path, real_images) -> None:
    root = tmp_path / "lab"
    files = [f for fs in real_images.values() for f in fs]
    for n in (10, 2, 1):
        (root / f"slide-{n}").mkdir(parents=True)
        for f in files[n : n + 3]:
            shutil.copy(f, root / f"slide-{n}" / f.name)
    result = CliRunner().invoke(cli.app, ["classify", str(root), "--model", str(model)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "Report:" not in line]  # a path is never cut
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "flagged" in line)
    for name in ["slide", "images", *LABELS, "flagged", "unreadable"]:
        assert name in header, header  # every class name whole, none cut with an ellipsis
    order = [line.split()[0] for line in lines if line.strip().startswith("slide-")]
    assert order == ["slide-1", "slide-2", "slide-10"]


def test_names_in_brackets_are_printed_as_they_are(model: Path, tmp_path: Path, real_images) -> None:
    """Folder names such as '[b] smear' reach the console whole (rich would take '[b]' for bold)."""
    root = tmp_path / "[lab] run"
    (root / "[b] smear").mkdir(parents=True)
    for f in [f for fs in real_images.values() for f in fs][:2]:
        shutil.copy(f, root / "[b] smear" / f.name)
    r = CliRunner().invoke(cli.app, ["classify", str(root), "--model", str(model)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "[b] smear" in r.stdout and f"Report: {root / 'bcc-report.xlsx'}" in r.stdout
    r = runner.invoke(cli.app, ["classify", str(tmp_path / "[missing] run"), "-m", str(model)])
    assert r.exit_code == 2 and "[missing] run" in r.output
    r = runner.invoke(cli.app, ["info", str(model)], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and str(model) in r.output


def test_quiet_prints_nothing_but_errors(model: Path, lab_folder: Path, tmp_path: Path) -> None:
    level = logging.getLogger("bcc_desk").level
    result = runner.invoke(cli.app, ["classify", str(lab_folder), "--model", str(model), "-q",
                                     "--out", str(tmp_path / "r.xlsx")])
    assert result.exit_code == 0 and result.output == "" and (tmp_path / "r.xlsx").is_file()
    assert logging.getLogger("bcc_desk").level == level  # quiet for that command only
    missing = runner.invoke(cli.app, ["classify", str(tmp_path / "nowhere"), "--model", str(model), "-q"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_help_shows_choices_and_bare_flags() -> None:
    from trainer import cli as train_cli

    for app, command in [(cli.app, "classify"), (cli.app, "watch"), (cli.app, "info"), (train_cli.app, "fit"),
                         (train_cli.app, "evaluate"), (train_cli.app, "int8"), (train_cli.app, "samples")]:
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "Usage:" in text and "<bool>" not in text and "{" not in text and "list[" not in text, text
    text = runner.invoke(cli.app, ["classify", "--help"], env={"COLUMNS": "200"}).output
    assert "Usage: bcc classify [OPTIONS] ROOT" in " ".join(text.split())
    assert "auto|cpu|cuda|cuda:N|mps" in text and "auto|fp32|bf16|fp16|int8" in text and "BUNDLE" in text


def test_pdf_beside_the_workbook_with_the_labs_identities(model: Path, lab_folder: Path, tmp_path: Path) -> None:
    """#36: `--pdf` adds the PDF report beside the workbook; slides.csv's patient ids reach both;
    `--out x.pdf` writes a PDF, never a workbook named .pdf."""
    (lab_folder / "slides.csv").write_text("slide,patient_id,accession\nslide-1,P-0071,ACC-1\n", encoding="utf-8")
    out = tmp_path / "r.xlsx"
    result = runner.invoke(cli.app, ["classify", str(lab_folder), "-m", str(model), "-o", str(out), "--pdf",
                                     "--lab-name", "Haematology <Lab> & Co"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
    assert str(tmp_path / "r.pdf") in result.stdout.replace("\n", "")
    slides = {s["slide"]: s for s in _rows(openpyxl.load_workbook(out)["Slides"])}
    assert (slides["slide-1"]["patient id"], slides["slide-1"]["accession"]) == ("P-0071", "ACC-1")
    assert slides["slide-1"]["verdict"]  # every slide has its verdict (a call or why there is none)
    pdf_only = tmp_path / "only.pdf"
    result = runner.invoke(cli.app, ["classify", str(lab_folder / "slide-1"), "-m", str(model), "-o", str(pdf_only), "-q"])
    assert result.exit_code == 0, result.output
    assert pdf_only.read_bytes().startswith(b"%PDF") and not list(tmp_path.glob("only*.xlsx"))


def test_bad_report_names_and_a_bad_slides_csv_are_usage_errors(model: Path, lab_folder: Path, tmp_path: Path) -> None:
    for args in (["-o", str(tmp_path / "r.pdf.txt")], ["-o", str(tmp_path / "r")], ["--csv", "-o", str(tmp_path / "r.xlsx")]):
        result = runner.invoke(cli.app, ["classify", str(lab_folder), "-m", str(model), *args])
        assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    (lab_folder / "slides.csv").write_text("slide,patient_id\nslide-1,a\nslide-1,b\n", encoding="utf-8")
    result = runner.invoke(cli.app, ["classify", str(lab_folder), "-m", str(model), "-o", str(tmp_path / "r.xlsx")])
    assert result.exit_code == 2 and "row 3 names slide 'slide-1' a second time" in result.output
    assert not (tmp_path / "r.xlsx").exists()  # said before an hour of classifying, nothing half done


def test_an_interrupted_run_says_how_far_it_got(model: Path, lab_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """Ctrl+C after three images: exit 130, and the report says "interrupted after 3 of N" and
    lists the images never classified (it used to read "still running")."""
    from bcc_desk.classifier import Classifier

    real = Classifier.predict_paths

    def interrupted(self, paths, root, **kwargs):
        for i, p in enumerate(real(self, paths, root, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt  # as Ctrl+C arrives in the middle of a run
            yield p

    monkeypatch.setattr(Classifier, "predict_paths", interrupted)
    out = tmp_path / "r.xlsx"
    result = runner.invoke(cli.app, ["classify", str(lab_folder), "-m", str(model), "-o", str(out)])
    assert result.exit_code == 130, result.output
    total = len(discover_images(lab_folder))
    wb = openpyxl.load_workbook(out)
    run = {r[0].value: r[1].value for r in wb["Run"].iter_rows()}
    assert run["run"].startswith(f"interrupted after 3 of {total} images")
    assert run["not classified"] == total - 3 and run["finished"] != "still running"
    assert len(_rows(wb["Not classified"])) == total - 3


def test_sigterm_stops_a_run_as_ctrl_c_does(model: Path, lab_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """A service manager (or `kill`) sends SIGTERM: the report of the images done is written,
    exit 130, as for Ctrl+C (issue #39: it wrote none).  The caller's own handler is back after."""
    import os
    import signal

    from bcc_desk.classifier import Classifier

    real = Classifier.predict_paths

    def terminated(self, paths, root, **kwargs):
        for i, p in enumerate(real(self, paths, root, **kwargs)):
            if i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield p

    monkeypatch.setattr(Classifier, "predict_paths", terminated)
    reached_ours: list[int] = []

    def ours(signum: int, frame: object) -> None:
        reached_ours.append(signum)

    before = signal.signal(signal.SIGTERM, ours)
    try:
        out = tmp_path / "r.xlsx"
        result = runner.invoke(cli.app, ["classify", str(lab_folder), "-m", str(model), "-o", str(out)])
        assert signal.getsignal(signal.SIGTERM) is ours and reached_ours == []  # classify's own, then ours again
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 130, result.output
    run = {r[0].value: r[1].value for r in openpyxl.load_workbook(out)["Run"].iter_rows()}
    assert run["run"].startswith(f"interrupted after 3 of {len(discover_images(lab_folder))} images")


def test_a_root_that_is_a_pipe_or_a_device_is_a_usage_error(model: Path, tmp_path: Path) -> None:
    """Issue #39: ROOT as a FIFO or /dev/null was a traceback with exit 1; never opened, one line."""
    import os

    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    for root in (fifo, Path("/dev/null")):
        result = runner.invoke(cli.app, ["classify", str(root), "-m", str(model), "-o", str(tmp_path / "r.xlsx")])
        assert result.exit_code == 2 and "is neither a folder nor an image file" in result.output, result.output
    assert not (tmp_path / "r.xlsx").exists()


def test_every_classifier_option_is_a_flag_of_classify_and_watch() -> None:
    """`RunSpec`'s options are read from the commands' parameters by name: a field without its
    flag would silently keep its default in `bcc classify` or `bcc watch`."""
    from dataclasses import fields

    import typer.main

    from bcc_desk.options import ClassifierOptions

    group = typer.main.get_command(cli.app)
    for name in ("classify", "watch"):
        flags = {p.name for p in group.commands[name].params}  # type: ignore[attr-defined]
        assert {f.name for f in fields(ClassifierOptions)} <= flags, name
        assert "model" in flags
