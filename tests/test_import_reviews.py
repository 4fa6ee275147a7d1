"""`bcc-train import-reviews` and `fit --init-bundle` on bad input: one clear line each, and nothing
half-imported (every workbook named is checked before the first image is copied)."""

from __future__ import annotations

import shutil
from pathlib import Path

import openpyxl
import pytest
from sessions import classified_session
from typer.testing import CliRunner

from bcc_desk import cli as bcc_cli
from trainer import cli as train_cli
from trainer.grouping import group_images
from trainer.manifest import MANIFEST, read_manifest

from bundles import CLASSES, LABELS, make_bundle
from folders import class_subset

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("model") / "atto")


@pytest.fixture()
def case(tmp_path: Path, all4: Path) -> Path:
    """Two slides of real images (two per class)."""
    root = tmp_path / "case"
    for i, c in enumerate(CLASSES):
        for j, f in enumerate(sorted((all4 / c).glob("*.jpg"))[1:3]):
            (root / f"slide-{(i + j) % 2}").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / f"slide-{(i + j) % 2}" / f.name)
    return root


@pytest.fixture()
def data(tmp_path: Path, all4: Path) -> Path:
    return class_subset(tmp_path / "data", all4, CLASSES, slice(10, 13))


def reviewed_export(case: Path, model: Path, out: Path, labels: dict[int, str]) -> Path:
    """The app's export with the given rows reviewed."""
    session = classified_session(model, case)
    for row, label in labels.items():
        session.set_review(row, label, "dr. Ada")
    written, _ = session.export(out)
    return written


def edit(workbook: Path, row: int, column: str, value: object) -> None:
    wb = openpyxl.load_workbook(workbook)
    ws = wb["Images"]
    col = [c.value for c in ws[1]].index(column) + 1
    ws.cell(row=row, column=col, value=value)
    wb.save(workbook)


def import_(*args: object):
    return runner.invoke(train_cli.app, ["import-reviews", *map(str, args)])


def one_line_error(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    text = " ".join(line.strip() for line in lines)
    assert text.startswith("error:") and all(p in text for p in phrases), result.output


def test_bad_workbooks_are_one_line_and_import_nothing(case: Path, model: Path, data: Path, tmp_path: Path) -> None:
    before = snapshot(data)
    good = reviewed_export(case, model, tmp_path / "good.xlsx", {0: LABELS[0], 1: LABELS[3]})

    # A plain bcc classify report has no reviewer columns.
    plain = tmp_path / "plain.xlsx"
    assert runner.invoke(bcc_cli.app, ["classify", str(case), "-m", str(model), "-o", str(plain)]).exit_code == 0
    one_line_error(import_(plain, "--into", data), "plain.xlsx has no 'reviewer label' column")

    # A class the model does not know: the valid ones are listed.
    unknown = reviewed_export(case, model, tmp_path / "unknown.xlsx", {0: LABELS[0], 1: LABELS[1]})
    edit(unknown, 3, "reviewer label", "Blast")
    one_line_error(import_(unknown, "--into", data), "unknown.xlsx, row 3", "'Blast' is not a class", ", ".join(LABELS))

    # A file name turned into a formula in Excel.
    formula = reviewed_export(case, model, tmp_path / "formula.xlsx", {0: LABELS[0], 1: LABELS[1]})
    edit(formula, 2, "file", '=HYPERLINK("http://x", "a.jpg")')
    one_line_error(import_(formula, "--into", data), "formula.xlsx, row 2", "'file' cell is a formula")

    # A reviewed image that is gone: the good workbook named first is not imported either.
    gone = reviewed_export(case, model, tmp_path / "gone.xlsx", {0: LABELS[0], 4: LABELS[2]})
    wb = openpyxl.load_workbook(gone, read_only=True)
    missing = list(wb["Images"].iter_rows(min_row=6, max_row=6, values_only=True))[0][0]  # row 4 of the session
    wb.close()
    moved = tmp_path / "moved.jpg"
    shutil.move(case / missing, moved)
    one_line_error(import_(good, gone, "--into", data), "gone.xlsx, row 6", f"{missing} is no longer in")
    assert snapshot(data) == before and not (data / MANIFEST).exists()
    shutil.move(moved, case / missing)

    # Not a workbook at all.
    one_line_error(import_(tmp_path / "nothing.xlsx", "--into", data), "nothing.xlsx: no such file")
    (tmp_path / "notes.xlsx").write_text("not a zip")
    one_line_error(import_(tmp_path / "notes.xlsx", "--into", data), "not a readable Excel workbook")
    assert snapshot(data) == before


def test_an_edited_classify_report_imports_from_the_moved_folder(case: Path, model: Path, data: Path, tmp_path: Path) -> None:
    """The lab's other way in: a bcc classify report with a `reviewer label` column typed in, the
    images since moved (--images); a relabelled image is refused rather than filed twice."""
    report = tmp_path / "report.xlsx"
    assert runner.invoke(bcc_cli.app, ["classify", str(case), "-m", str(model), "-o", str(report)]).exit_code == 0
    wb = openpyxl.load_workbook(report)
    ws = wb["Images"]
    col = ws.max_column + 1
    ws.cell(row=1, column=col, value="Reviewer label")
    ws.cell(row=2, column=col, value="pro-b")  # as typed: case and the data set's tag do not matter
    ws.cell(row=3, column=col, value="[Malignant] early Pre-B")
    files = [ws.cell(row=r, column=1).value for r in (2, 3)]
    wb.save(report)
    moved = tmp_path / "archive" / "case"
    shutil.move(case, moved)
    one_line_error(import_(report, "--into", data), "give it with --images")

    r = import_(report, "--into", data, "--images", moved)
    assert r.exit_code == 0 and "2 images added" in r.output, r.output
    rows = read_manifest(data)
    assert [(row["file"], row["class"]) for row in rows] == [(files[0], CLASSES[3]), (files[1], CLASSES[1])]
    assert rows[0]["reviewed_by"] == "" and rows[0]["root"] == str(moved)
    assert all((data / row["path"]).read_bytes() == (moved / row["file"]).read_bytes() for row in rows)

    ws.cell(row=2, column=col, value="Benign")
    wb.save(report)
    before = snapshot(data)
    one_line_error(import_(report, "--into", data, "--images", moved), "row 2", "was imported before as", "delete its row")
    assert snapshot(data) == before


def test_a_new_data_folder_takes_the_models_class_names(case: Path, model: Path, tmp_path: Path) -> None:
    workbook = reviewed_export(case, model, tmp_path / "w.xlsx", {0: LABELS[1], 1: LABELS[1], 2: LABELS[2]})
    fresh = tmp_path / "lab-data"
    r = import_(workbook, "--into", fresh)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in fresh.iterdir()) == sorted([LABELS[1], LABELS[2], MANIFEST])
    assert len(list((fresh / LABELS[1]).iterdir())) == 2


def test_images_of_one_slide_share_a_group() -> None:
    paths = ["a/x-1.jpg", "a/y-500.jpg", "b/z-900.jpg", "b/w-77.jpg"]
    hashes = ["0000000000000000", "ffffffffffffffff", "0f0f0f0f0f0f0f0f", "f0f0f0f0f0f0f0f0"]
    assert len(set(group_images(paths, hashes))) == 4
    groups = group_images(paths, hashes, slides=["lab\tslide-1", None, "lab\tslide-1", None])
    assert groups[0] == groups[2] and len(set(groups)) == 3


def test_fine_tuning_refuses_other_classes_and_another_head(model: Path, data: Path, tmp_path: Path) -> None:
    base = ["fit", str(data), "--init-bundle", str(model), "--epochs", "1", "--no-int8", "--device", "cpu"]
    r = runner.invoke(train_cli.app, [*base, "--out", str(tmp_path / "a"), "--hidden", "32"])
    one_line_error(r, "--init-bundle", "with a head of []", "leave out --arch and --hidden")
    (data / "Blasts").mkdir()
    shutil.copy(next((data / CLASSES[0]).iterdir()), data / "Blasts" / "b.jpg")
    r = runner.invoke(train_cli.app, [*base, "--out", str(tmp_path / "b")])
    one_line_error(r, "the data's class 'Blasts' is not one of", "fine-tuning keeps the classes")
    shutil.rmtree(data / "Blasts")
    shutil.rmtree(data / CLASSES[2])
    r = runner.invoke(train_cli.app, [*base, "--out", str(tmp_path / "c")])
    one_line_error(r, "the data has no images of Pre-B")
    one_line_error(runner.invoke(train_cli.app, [*base[:2], "--init-bundle", str(tmp_path / "none"), "--out", str(tmp_path / "d")]),
                   "--init-bundle", "not found")


def test_one_image_under_two_labels_in_one_import_is_refused(case: Path, model: Path, data: Path, tmp_path: Path) -> None:
    first = sorted(case.rglob("*.jpg"))[0]
    shutil.copy(first, case / "slide-1" / "copy.jpg")  # the same field saved twice, labelled twice
    session = classified_session(model, case)
    session.set_review(session.find(first), LABELS[0], "dr. Ada")
    session.set_review(session.find(case / "slide-1" / "copy.jpg"), LABELS[1], "dr. Bo")
    workbook, _ = session.export(tmp_path / "twice.xlsx")
    before = snapshot(data)
    one_line_error(import_(workbook, "--into", data), "slide-1/copy.jpg is the same image as", "labelled")
    assert snapshot(data) == before


def test_a_run_sheet_class_that_leads_out_of_data_is_refused_and_nothing_is_written(case: Path, model: Path,
                                                                                    tmp_path: Path) -> None:
    """Hostile input (issue #39): a Run sheet whose classes name `../../x` or an absolute path
    once copied images there.  Now one line, and nothing written anywhere."""
    for escape in ("../../outside", str(tmp_path / "absolute")):
        workbook = reviewed_export(case, model, tmp_path / "w.xlsx", {0: LABELS[1]})
        wb = openpyxl.load_workbook(workbook)
        run = wb["Run"]
        row = next(r for r in run.iter_rows(min_row=2) if r[0].value == "classes")
        row[1].value = "; ".join([escape, *LABELS[1:]])
        wb.save(workbook)
        edit(workbook, 2, "reviewer label", escape)
        fresh = tmp_path / "lab" / "data"
        one_line_error(import_(workbook, "--into", fresh), "w.xlsx, row 2", "cannot be a folder name inside the data folder")
        assert not fresh.exists() and not (tmp_path / "outside").exists() and not (tmp_path / "absolute").exists()


def test_a_pipe_named_xlsx_and_a_workbook_that_inflates_too_far_are_refused_before_reading(
        case: Path, model: Path, data: Path, tmp_path: Path, monkeypatch) -> None:
    import os
    import zipfile

    from trainer import reviews

    fifo = tmp_path / "x.xlsx"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    one_line_error(import_(fifo, "--into", data), "x.xlsx: not a regular file")
    workbook = reviewed_export(case, model, tmp_path / "w.xlsx", {0: LABELS[1]})
    unpacked = sum(i.file_size for i in zipfile.ZipFile(workbook).infolist())
    monkeypatch.setattr(reviews, "MAX_UNPACKED_BYTES", unpacked - 1)  # the same check a 4 GB bomb meets
    one_line_error(import_(workbook, "--into", data), "w.xlsx: its parts inflate to", "not read")
