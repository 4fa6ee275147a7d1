"""The review session without a display: rows, a person's labels with who and when, per-slide
counts shared with the report and the console, and the export read back."""

from __future__ import annotations

from pathlib import Path

import openpyxl
import pytest
from rich.console import Console

from bcc_desk.bundle import load_bundle
from bcc_desk.images import discover_images
from bcc_desk.options import ClassifierOptions
from bcc_desk.prediction import error_prediction
from bcc_desk.report import write_report
from bcc_desk.review import REVIEW_COLUMNS, ReviewSession
from bcc_desk.run_record import RunInfo, run_info
from bcc_desk.slides import count_slides

from bundles import LABELS, make_bundle
from folders import slide_folders


@pytest.fixture(scope="module")
def classified(tmp_path_factory, real_images) -> tuple[Path, list, RunInfo]:
    """Real images in three slide folders and an unreadable file, classified by a small real
    model: (folder, predictions in discovery order, the run's record)."""
    root = slide_folders(tmp_path_factory.mktemp("review") / "case", real_images, 3, ("slide-10", "slide-2", "slide-1"))
    bundle = load_bundle(make_bundle(tmp_path_factory.mktemp("review-model") / "atto", review_threshold=0.6))
    classifier = ClassifierOptions(device="cpu").build(bundle)
    predictions = list(classifier.predict_paths(discover_images(root), root))
    return root, predictions, run_info(classifier, root=root, command="bcc-desk case")


def session_of(root: Path, predictions: list, info: RunInfo) -> ReviewSession:
    session = ReviewSession()
    session.classes = list(info.classes)
    session.start(root)
    session.run_info = info
    session.add(predictions)
    return session


def test_one_row_per_image_and_observers_told_of_each_change(classified) -> None:
    root, predictions, info = classified
    session = ReviewSession()
    seen: list[tuple] = []
    session.inserting.connect(lambda a, b: seen.append(("inserting", a, b, len(session))))
    session.inserted.connect(lambda a, b: seen.append(("inserted", a, b, len(session))))
    session.changed.connect(lambda a, b: seen.append(("changed", a, b)))
    session.start(root)
    assert session.add(predictions[:5]) == []
    assert session.add(predictions[5:]) == []
    n = len(predictions)
    assert seen == [("inserting", 0, 4, 0), ("inserted", 0, 4, 5), ("inserting", 5, n - 1, 5), ("inserted", 5, n - 1, n)]
    # A watched file written again: its one row takes the new prediction.
    seen.clear()
    again = predictions[3]
    assert session.add([again]) == [predictions[3]] and len(session) == n
    assert seen == [("changed", 3, 3)] and session.row_of(again.path) == 3


def test_reviews_record_who_and_when_and_refuse_what_cannot_be(classified) -> None:
    root, predictions, info = classified
    session = session_of(root, predictions, info)
    good = next(i for i, p in enumerate(predictions) if p.ok)
    bad = next(i for i, p in enumerate(predictions) if not p.ok)
    assert not session.unexported_reviews
    session.set_review(good, LABELS[2], "dr. =Ada")
    review = session.review(good)
    assert review is not None and review.label == LABELS[2] and review.by == "dr. =Ada" and review.at.tzinfo
    assert session.unexported_reviews
    with pytest.raises(ValueError, match="not one of the model's classes"):
        session.set_review(good, "Blast", "dr. Ada")
    with pytest.raises(ValueError, match="unreadable"):
        session.set_review(bad, LABELS[0], "dr. Ada")
    # The ways the app names an image all find the same row.
    assert session.find(predictions[good].file) == session.find(predictions[good].path) == session.find(good) == good
    with pytest.raises(KeyError):
        session.find("slide-3/none.jpg")
    session.set_review(good, None, "dr. Ada")
    assert session.review(good) is None and session.reviews() == {}


def test_same_folder_again_keeps_reviews_another_folder_drops_them(classified, tmp_path: Path) -> None:
    root, predictions, info = classified
    session = session_of(root, predictions, info)
    session.set_review(0, LABELS[1], "ada")
    session.start(root)
    assert len(session) == 0 and session.run_info is None
    session.add(predictions)
    assert session.reviews()[predictions[0].path].label == LABELS[1]
    session.start(tmp_path)
    assert session.reviews() == {} and not session.unexported_reviews


def test_counts_per_slide_are_the_reports_and_the_consoles_and_take_the_reviewers_label(classified, tmp_path) -> None:
    from bcc_desk.cli import summary_table

    root, predictions, info = classified
    session = session_of(root, predictions, info)
    counts = session.slide_counts()
    assert list(counts) == ["slide-1", "slide-2", "slide-10"]
    # The workbook's Slides sheet: the same slides, order and numbers.
    out = write_report(predictions, tmp_path / "r.xlsx", info)
    sheet = list(openpyxl.load_workbook(out)["Slides"].iter_rows(min_row=2, values_only=True))
    header = [c.value for c in openpyxl.load_workbook(out)["Slides"][1]]
    for row, (slide, count) in zip(sheet, counts.items(), strict=False):
        values = dict(zip(header, row, strict=True))
        assert values["slide"] == slide and values["images"] == count.images
        assert values["flagged"] == count.flagged and values["unreadable"] == count.unreadable
        assert [values[f"n: {c}"] for c in info.classes] == [count.per_class.get(c, 0) for c in info.classes]
    # The console's closing table: the same rows.
    console = Console(width=200, record=True)
    console.print(summary_table(predictions, info.classes))
    lines = [line.split() for line in console.export_text().splitlines() if line.strip().startswith("slide-")]
    assert [(cells[0], int(cells[1])) for cells in lines] == [(s, c.images) for s, c in counts.items()]
    # A reviewed image counts under the reviewer's label.
    row = next(i for i, p in enumerate(predictions) if p.ok and p.slide == "slide-2")
    model_label = predictions[row].label
    other = next(c for c in info.classes if c != model_label)
    session.set_review(row, other, "ada")
    after = session.slide_counts()["slide-2"]
    assert after.reviewed == 1 and after.images == counts["slide-2"].images
    assert after.per_class.get(other, 0) == counts["slide-2"].per_class.get(other, 0) + 1
    assert after.per_class.get(model_label, 0) == counts["slide-2"].per_class.get(model_label, 0) - 1


def test_one_slide_order_whatever_the_names(tmp_path: Path) -> None:
    """Natural order (slide-2 before slide-10) in the app and the workbook alike, and a name with
    a superscript digit (which `str.isdigit` calls a digit) is no crash."""
    root = tmp_path / "lab"
    names = ["slide-10", "slide 1\u00b2", "Slide-2", "slide-2", "x"]
    preds = [error_prediction(root / n / "a.jpg", root, "unreadable", "m", "0" * 64) for n in names]
    shown = list(count_slides(preds))
    run = RunInfo.collect(models=[("m", "0" * 64)], classes=LABELS, review_threshold=0.5, ood_check="off", tta=False,
                          device="cpu (fp32)", root=root)
    out = write_report(preds, tmp_path / "r.xlsx", run)
    sheet = [r[0] for r in openpyxl.load_workbook(out)["Slides"].iter_rows(min_row=2, values_only=True)]
    assert shown == sheet[: len(names)] and sorted(shown) == sorted(names)
    assert shown.index("slide-2") < shown.index("slide-10")


def test_export_writes_reviews_and_the_run_and_only_the_latest_clears_the_flag(classified, tmp_path: Path) -> None:
    root, predictions, info = classified
    session = ReviewSession()
    with pytest.raises(ValueError, match="nothing to export"):
        session.snapshot()
    session = session_of(root, predictions, info)
    good = [i for i, p in enumerate(predictions) if p.ok]
    session.set_review(good[0], LABELS[3], "=ada")
    snapshot = session.snapshot()
    session.set_review(good[1], LABELS[0], "bob")  # made while the export is being written
    written, diverted = snapshot.write(tmp_path / "review.xlsx")
    session.exported(snapshot)
    assert written == tmp_path / "review.xlsx" and diverted is None
    assert session.unexported_reviews  # bob's review is not in that file
    session.finish(True)
    written, _ = session.export(tmp_path / "review2.xlsx")
    assert not session.unexported_reviews
    wb = openpyxl.load_workbook(written)
    images = wb["Images"]
    header = [c.value for c in images[1]]
    assert header[-3:] == list(REVIEW_COLUMNS)
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in images.iter_rows(min_row=2, values_only=True)}
    first, second = predictions[good[0]], predictions[good[1]]
    assert rows[first.file]["reviewer label"] == LABELS[3] and rows[first.file]["reviewed by"] == "=ada"
    assert images.cell(row=list(rows).index(first.file) + 2, column=header.index("reviewed by") + 1).data_type == "s"
    assert rows[second.file]["reviewer label"] == LABELS[0] and rows[second.file]["label"] == second.label
    assert len(rows) == len(predictions)
    run = {r[0]: r[1] for r in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert run["run"] == "complete" and run["reviewed images"] == "2"
    assert info.models[0][1] in " ".join(str(v) for v in run.values())


def test_a_signature_is_recorded_exported_and_cleared_by_a_later_review(classified, tmp_path: Path) -> None:
    """#36: a reviewer signs a slide; changing a review of it afterwards clears the signature and
    says so; the export's Slides and Run sheets record what stood when it was written."""
    root, predictions, info = classified
    session = session_of(root, predictions, info)
    cleared: list[tuple[str, str]] = []
    session.signature_cleared.connect(lambda slide, message: cleared.append((slide, message)))
    with pytest.raises(ValueError, match="name"):
        session.sign("slide-2", "  ")
    with pytest.raises(ValueError, match="no such slide"):
        session.sign("slide-3", "dr. b")
    signature = session.sign("slide-2", "dr. b")
    assert session.signature("slide-2") == signature and signature.at.tzinfo is not None
    assert session.unexported_reviews  # a signature is work to export
    out, _ = session.export(tmp_path / "signed.xlsx")
    wb = openpyxl.load_workbook(out)
    slides = {r[0]: r for r in wb["Slides"].iter_rows(min_row=2, values_only=True)}
    header = [c.value for c in wb["Slides"][1]]
    assert slides["slide-2"][header.index("signed by")] == "dr. b"
    assert slides["slide-1"][header.index("signed by")] is None
    assert dict(wb["Run"].iter_rows(min_row=2, values_only=True))["signed slides"] == 1
    # A review of another slide leaves it signed; one of its own clears it, with a message.
    other = next(i for i, p in enumerate(predictions) if p.ok and p.slide == "slide-1")
    session.set_review(other, LABELS[0], "dr. b")
    assert session.signature("slide-2") is not None and cleared == []
    own = next(i for i, p in enumerate(predictions) if p.ok and p.slide == "slide-2")
    session.set_review(own, LABELS[1], "dr. c")
    assert session.signature("slide-2") is None
    assert cleared == [("slide-2", "The signature of slide slide-2 was cleared: a review changed after it was signed. "
                                   "Sign it again once it is reviewed.")]
    assert session.lab_records().signatures == {}


def test_identities_come_from_slides_csv_and_edits_go_back_to_it(classified, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    from bcc_desk.lab_records import SLIDES_CSV, SlideIdentity, SlidesFileError, read_slides_csv

    root, predictions, info = classified
    folder = tmp_path / "case"
    shutil.copytree(root, folder)
    moved = [dataclasses.replace(p, path=folder / p.file) for p in predictions]
    (folder / SLIDES_CSV).write_text("slide,patient_id\nslide-1,P-1\n", encoding="utf-8")
    session = session_of(folder, moved, info)
    assert session.identities == {"slide-1": SlideIdentity("P-1")}
    assert session.set_identity("slide-2", SlideIdentity(" P-2 ", "A-9", "2026-12-01")) == folder / SLIDES_CSV
    assert read_slides_csv(folder) == {"slide-1": SlideIdentity("P-1"), "slide-2": SlideIdentity("P-2", "A-9", "2026-12-01")}
    with pytest.raises(SlidesFileError, match="specimen_date"):
        session.set_identity("slide-2", SlideIdentity("P-2", specimen_date="yesterday"))
    assert session.identities["slide-2"].specimen_date == "2026-12-01"  # a refused edit changes nothing
    out, _ = session.export(tmp_path / "r.xlsx")
    images = list(openpyxl.load_workbook(out)["Images"].iter_rows(values_only=True))
    patient = {r[0]: r[images[0].index("patient_id")] for r in images[1:]}
    assert {patient[p.file] for p in moved if p.slide == "slide-2"} == {"P-2"}
    # A bad file: the run goes on without identities, and the one line says which row.
    (folder / SLIDES_CSV).write_text("slide,patient_id\nslide-1,a\nslide-1,b\n", encoding="utf-8")
    problem = session.start(folder)
    assert problem is not None and "row 3" in problem and session.identities == {}


def test_a_stopped_run_lists_the_images_it_never_reached(classified, tmp_path: Path) -> None:
    root, predictions, info = classified
    session = ReviewSession()
    session.classes = list(info.classes)
    session.start(root)
    session.run_info = info
    session.add(predictions[:4])
    session.finish(False)
    assert sorted(session.not_classified) == sorted(p.file for p in predictions[4:])
    out, _ = session.export(tmp_path / "stopped.xlsx")
    wb = openpyxl.load_workbook(out)
    run = dict(wb["Run"].iter_rows(min_row=2, values_only=True))
    assert run["run"].startswith(f"interrupted after 4 of {len(predictions)} images")
    assert len(list(wb["Not classified"].iter_rows(min_row=2))) == len(predictions) - 4
