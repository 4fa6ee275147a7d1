"""The Excel/CSV report: real workbooks written to tmp_path and read back with openpyxl."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import re
import stat
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import openpyxl
import pytest

from bcc_desk import __version__
from bcc_desk.lab_records import LabRecords, Signature, SlideIdentity
from bcc_desk.prediction import Prediction, error_prediction, relative_location
from bcc_desk.report import IMAGE_COLUMNS, write_csv, write_report
from bcc_desk.report_file import ReportError, locked_target
from bcc_desk.report_target import writer_for
from bcc_desk.run_record import RunInfo
from bcc_desk.verdict import DECISION_AID

CLASSES = ["Benign", "[Malignant] early Pre-B", "[Malignant] Pre-B", "[Malignant] Pro-B"]
MODEL, SHA = "convnext_tiny-all4", "ab" * 32
AT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=5)))
SIBLING = re.compile(r"^report \(\d{4}-\d{2}-\d{2} \d{6}\)\.xlsx$")


def local(t: datetime) -> datetime:
    return t.astimezone().replace(tzinfo=None, microsecond=0)


def pred(root: Path, rel: str, probs: list[float], reason: str = "", ood: float | None = None) -> Prediction:
    path = root / rel
    file, slide = relative_location(path, root)
    ranked = sorted(probs, reverse=True)
    return Prediction(
        path=path,
        file=file,
        slide=slide,
        label=CLASSES[probs.index(ranked[0])],
        confidence=ranked[0],
        margin=ranked[0] - ranked[1],
        probabilities=dict(zip(CLASSES, probs)),
        needs_review=bool(reason),
        review_reason=reason,
        error=None,
        model=MODEL,
        model_sha256=SHA,
        classified_at=AT,
        ood_score=ood,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "smears"
    r.mkdir()
    return r


@pytest.fixture
def preds(root: Path) -> list[Prediction]:
    broken = error_prediction(root / "P10" / "broken.jpg", root, "cannot identify image file", MODEL, SHA)
    return [
        pred(root, "P10/-2.jpg", [0.1, 0.2, 0.6, 0.1], ood=1.25),
        pred(root, "P10/+1.jpg", [0.05, 0.05, 0.1, 0.8]),
        broken,
        pred(root, "P2/=cmd.jpg", [0.7, 0.1, 0.1, 0.1]),
        pred(root, "P2/@SUM(A1).jpg", [0.4, 0.35, 0.15, 0.1], reason="low confidence"),
        pred(root, "P2/blåst-細胞.jpg", [0.1, 0.7, 0.1, 0.1]),
        pred(root, "top.jpg", [0.9, 0.04, 0.03, 0.03]),
        pred(root, "#REF!/x.jpg", [0.2, 0.2, 0.5, 0.1], reason="low confidence; unlike training data", ood=9.5),
    ]


@pytest.fixture
def run(root: Path) -> RunInfo:
    return RunInfo(
        software_version=__version__,
        models=[(MODEL, SHA)],
        classes=CLASSES,
        review_threshold=0.6,
        ood_check="on",
        tta=False,
        device="cpu (bf16)",
        started=datetime(2024, 5, 6, 7, 0, 0, tzinfo=timezone.utc),
        finished=datetime(2024, 5, 6, 7, 1, 23, tzinfo=timezone.utc),
        root=str(root),
        host="lab-pc-3",
        user="=tech",
        command="bcc classify smears --out report.xlsx",
        extra={"watch settle seconds": "2"},
    )


def sheet_rows(ws) -> list[list[object]]:
    return [[c.value for c in row] for row in ws.iter_rows()]


# Sorted by slide then file, naturally: "P2" before "P10"; the root's own name is a slide.
ORDER = ["#REF!/x.jpg", "P2/=cmd.jpg", "P2/@SUM(A1).jpg", "P2/blåst-細胞.jpg",
         "P10/+1.jpg", "P10/-2.jpg", "P10/broken.jpg", "top.jpg"]


def test_image_columns_are_the_contract():
    # a reader's order (#36): where, what, must a person look and why; the numbers; the audit trail
    assert IMAGE_COLUMNS(CLASSES) == [
        "file", "slide", "patient_id", "label", "confidence", "needs_review", "review_reason", "error",
        "p: Benign", "p: [Malignant] early Pre-B", "p: [Malignant] Pre-B", "p: [Malignant] Pro-B",
        "margin", "ood_score", "colour_score", "model", "model_sha256", "classified_at",
    ]


def test_images_sheet_every_column(tmp_path, preds, run):
    out = tmp_path / "report.xlsx"
    assert write_report(preds, out, run) == out
    wb = openpyxl.load_workbook(out)
    assert wb.sheetnames == ["Images", "Slides", "Run"]
    ws = wb["Images"]
    rows = sheet_rows(ws)
    assert rows[0] == IMAGE_COLUMNS(CLASSES)
    assert [r[0] for r in rows[1:]] == ORDER
    by_file = {p.file: p for p in preds}
    for row in ws.iter_rows(min_row=2):
        p = by_file[row[0].value]
        cells = dict(zip(IMAGE_COLUMNS(CLASSES), row))
        assert cells["slide"].value == p.slide
        assert cells["label"].value == p.label
        assert cells["needs_review"].value is p.needs_review
        assert cells["error"].value == p.error
        assert cells["model"].value == MODEL
        assert cells["model_sha256"].value == SHA
        assert cells["review_reason"].value == (p.review_reason or None)
        for name in ["confidence", "margin"] + [f"p: {c}" for c in CLASSES]:
            want = getattr(p, name) if name in ("confidence", "margin") else p.probabilities.get(name[3:])
            if want is None:
                assert cells[name].value is None, name
            else:
                assert cells[name].value == pytest.approx(want), name
                assert cells[name].number_format == "0.0%", name
        if p.ood_score is None:
            assert cells["ood_score"].value is None
        else:
            assert cells["ood_score"].value == pytest.approx(p.ood_score)
        at = cells["classified_at"]
        assert isinstance(at.value, datetime) and at.value.tzinfo is None
        assert at.value == local(p.classified_at)
        assert at.number_format == "yyyy-mm-dd hh:mm:ss"
    # the error row: no label, no numbers, the one-line reason
    err = dict(zip(rows[0], rows[1 + ORDER.index("P10/broken.jpg")]))
    assert (err["label"], err["confidence"], err["margin"]) == (None, None, None)
    assert err["error"] == "cannot identify image file"
    assert [err[f"p: {c}"] for c in CLASSES] == [None] * 4
    assert err["needs_review"] is True  # flagged: a person must look at what could not be read
    assert rows[1][1] == "#REF!" and rows[-1][1] == "smears"


def test_formula_like_text_is_stored_as_text(tmp_path, preds, run):
    out = tmp_path / "report.xlsx"
    write_report(preds, out, run)
    ws = openpyxl.load_workbook(out)["Images"]
    cells = {c.value: c for c in ws["A"][1:]}
    for name in ["P2/=cmd.jpg", "P2/@SUM(A1).jpg", "P10/+1.jpg", "P10/-2.jpg"]:
        assert cells[name].data_type == "s" and cells[name].value == name
    slide = ws["B2"]
    assert slide.value == "#REF!" and slide.data_type == "s"  # not an Excel error cell
    # a file literally named "=cmd.jpg" in the root: the cell starts with "=" and stays text
    p = pred(tmp_path, "=cmd.jpg", [0.7, 0.1, 0.1, 0.1])
    write_report([p], out, run)
    wb = openpyxl.load_workbook(out)
    a2 = wb["Images"]["A2"]
    assert a2.value == "=cmd.jpg" and a2.data_type == "s"
    run_values = {r[0]: r[1] for r in sheet_rows(wb["Run"])[1:]}
    assert run_values["user"] == "=tech"
    # and no formula anywhere in the file as Excel will read it
    with zipfile.ZipFile(out) as z:
        for name in z.namelist():
            if name.startswith("xl/worksheets/"):
                assert "<f>" not in z.read(name).decode() and "<f " not in z.read(name).decode()


def test_images_sheet_layout(tmp_path, preds, run):
    out = tmp_path / "report.xlsx"
    write_report(preds, out, run)
    ws = openpyxl.load_workbook(out)["Images"]
    assert ws.freeze_panes == "A2"
    assert ws.auto_filter.ref == f"A1:R{len(preds) + 1}"
    assert all(c.font.b for c in ws[1])
    names = IMAGE_COLUMNS(CLASSES)
    for r, file in enumerate(ORDER, start=2):
        p = next(q for q in preds if q.file == file)
        colours = {c.fill.fgColor.rgb if c.fill.fill_type == "solid" else None for c in ws[r]}
        if p.error:
            assert colours == {"00F8CBAD"}, file
        elif p.needs_review:
            assert colours == {"00FFF2CC"}, file
        else:
            assert colours == {None}, file
    for i, name in enumerate(names, start=1):
        width = ws.column_dimensions[openpyxl.utils.get_column_letter(i)].width
        # as wide as the longest word of the header (which wraps), the sha256 cut on paper (its cell holds it whole)
        assert min(max(map(len, name.split())), 10) + 2 <= width <= 52, name
    assert ws["A1"].alignment.wrap_text and ws.row_dimensions[1].height == 30


def test_slides_sheet_counts_and_shares(tmp_path, preds, run):
    out = tmp_path / "report.xlsx"
    write_report(preds, out, run)
    ws = openpyxl.load_workbook(out)["Slides"]
    rows = sheet_rows(ws)
    header = ["slide", "patient id", "accession", "specimen date", "lab note", "verdict", "to review", "images", "classified"]
    for c in CLASSES:
        header += [f"n: {c}", f"%: {c}"]
    assert rows[0] == header + ["flagged", "unreadable", "note", "signed by", "signed at"]
    assert rows[-1] == [DECISION_AID] + [None] * (len(header) + 4)  # under the table, after a blank row
    rows = rows[:-2]
    table = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == ["#REF!", "P2", "P10", "smears", "All slides"]
    p10 = table["P10"]
    assert (p10["images"], p10["classified"], p10["flagged"], p10["unreadable"]) == (3, 2, 1, 1)
    assert p10["n: [Malignant] Pre-B"] == 1 and p10["n: [Malignant] Pro-B"] == 1
    assert p10["%: [Malignant] Pre-B"] == pytest.approx(0.5)  # share of classified, not of images
    p2 = table["P2"]
    assert (p2["images"], p2["classified"], p2["flagged"], p2["unreadable"]) == (3, 3, 1, 0)
    assert p2["n: Benign"] == 2 and p2["n: [Malignant] early Pre-B"] == 1
    for slide, row in table.items():
        assert sum(row[f"%: {c}"] for c in CLASSES) == pytest.approx(1.0), slide
        assert sum(row[f"n: {c}"] for c in CLASSES) == row["classified"], slide
    total = table["All slides"]
    assert (total["images"], total["classified"], total["flagged"], total["unreadable"]) == (8, 7, 3, 1)
    assert total["n: Benign"] == 3
    assert total["%: Benign"] == pytest.approx(3 / 7)
    for cell in ws[2]:
        if cell.column_letter != "A" and rows[0][cell.column - 1].startswith("%: "):
            assert cell.number_format == "0.0%"
    assert all(c.font.b for c in ws[len(rows)])
    assert ws["A2"].data_type == "s"


def test_run_sheet_fields(tmp_path, preds, run):
    out = tmp_path / "report.xlsx"
    write_report(preds, out, run)
    rows = sheet_rows(openpyxl.load_workbook(out)["Run"])
    assert rows[0] == ["field", "value"]
    f = {r[0]: r[1] for r in rows[1:]}
    assert f["software version"] == __version__
    assert f["model"] == MODEL and f["model sha256"] == SHA
    assert f["classes"] == "; ".join(CLASSES)
    assert f["review threshold"] == pytest.approx(0.6)
    assert f["out-of-distribution check"] == "on"
    assert f["test-time augmentation"] == "off"
    assert f["device"] == "cpu (bf16)"
    assert f["started"] == local(run.started) and f["finished"] == local(run.finished)
    assert f["duration"] == "0:01:23"
    assert f["root"] == run.root and f["host"] == "lab-pc-3" and f["user"] == "=tech"
    assert f["command"] == run.command
    assert (f["images"], f["classified"], f["flagged"], f["unreadable"]) == (8, 7, 3, 1)
    assert isinstance(f["report written"], datetime)
    assert f["watch settle seconds"] == "2"


def test_run_still_going_and_several_models(tmp_path, preds, run):
    run.finished = None
    run.models = [("a", "1" * 64), ("b", "2" * 64)]
    out = write_report(preds, tmp_path / "report.xlsx", run)
    f = {r[0]: r[1] for r in sheet_rows(openpyxl.load_workbook(out)["Run"])[1:]}
    assert f["finished"] == "still running" and f["duration"] == "still running"
    assert (f["model 1"], f["model 1 sha256"], f["model 2"], f["model 2 sha256"]) == ("a", "1" * 64, "b", "2" * 64)


def test_runinfo_collect_fills_machine_facts(root):
    info = RunInfo.collect(models=[(MODEL, SHA)], classes=CLASSES, review_threshold=0.6,
                           ood_check="off", tta=True, device="cpu", root=root, command="bcc classify x")
    assert info.software_version == __version__
    assert info.host and info.user and info.command == "bcc classify x"
    assert info.started.tzinfo is not None and info.finished is None and info.root == str(root)


def test_empty_run_and_awkward_values_still_make_a_valid_workbook(tmp_path, root, run):
    out = write_report([], tmp_path / "empty.xlsx", run)
    wb = openpyxl.load_workbook(out)
    assert sheet_rows(wb["Images"]) == [IMAGE_COLUMNS(CLASSES)]
    slides = sheet_rows(wb["Slides"])
    total = dict(zip(slides[0], slides[-3]))
    assert total["slide"] == "All slides" and (total["images"], total["classified"], total["flagged"], total["unreadable"]) == (0, 0, 0, 0)
    assert total["note"] is None and total["signed by"] == "0 of 0 signed"
    # NaN from a broken model and a control character in a file name must not break the file
    odd = pred(root, "P1/scan\x1b01.jpg", [0.7, 0.1, 0.1, 0.1], ood=math.nan)
    write_report([odd], out, run)
    ws = openpyxl.load_workbook(out)["Images"]
    assert ws["A2"].value == "P1/scan\\x1b01.jpg"
    assert ws.cell(row=2, column=IMAGE_COLUMNS(CLASSES).index("ood_score") + 1).value is None


def test_extra_columns_for_reviewers(tmp_path, preds, run):
    reviewed = datetime(2024, 5, 7, 9, 0, tzinfo=timezone.utc)
    extra = {
        "reviewer label": lambda p: "=HYPERLINK(\"x\")" if p.file == "top.jpg" else None,
        "reviewed by": lambda p: "dr. a" if p.needs_review else None,
        "reviewed at": lambda p: reviewed if p.needs_review else None,
    }
    out = write_report(preds, tmp_path / "report.xlsx", run, extra_columns=extra)
    ws = openpyxl.load_workbook(out)["Images"]
    rows = sheet_rows(ws)
    assert rows[0] == IMAGE_COLUMNS(CLASSES) + list(extra)
    assert ws.auto_filter.ref == f"A1:U{len(preds) + 1}"
    col = rows[0].index("reviewer label")  # after every column of the report's own
    top = ws.cell(row=1 + ORDER.index("top.jpg") + 1, column=col + 1)
    assert top.value == '=HYPERLINK("x")' and top.data_type == "s"
    flagged = rows[1 + ORDER.index("P2/@SUM(A1).jpg")]
    assert flagged[col + 1] == "dr. a" and flagged[col + 2] == local(reviewed)
    csv_out = write_csv(preds, tmp_path / "report.csv", run, extra_columns=extra)
    with open(csv_out, encoding="utf-8-sig", newline="") as fh:
        got = list(csv.reader(fh))
    assert got[0][-3:] == list(extra)
    assert got[1 + ORDER.index("top.jpg")][col] == "'=HYPERLINK(\"x\")"
    with pytest.raises(ValueError, match="clash"):
        write_report(preds, tmp_path / "x.xlsx", run, extra_columns={"label": lambda p: 1})


def test_atomic_save_leaves_only_the_report(tmp_path, preds, run):
    out = tmp_path / "report.xlsx"
    write_report(preds, out, run)
    write_report(preds, out, run)  # rewriting in place, as the daemon does
    assert sorted(os.listdir(tmp_path)) == ["report.xlsx", "smears"]
    umask = os.umask(0)
    os.umask(umask)
    # readable by colleagues as the umask allows, not the 0600 of a temporary file
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    out.chmod(0o640)
    write_report(preds, out, run)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_failure_mid_save_keeps_old_report_and_no_temp(tmp_path, root, preds, run):
    out = tmp_path / "report.xlsx"
    write_report(preds, out, run)
    before = out.read_bytes()
    bad = pred(root, "P3/bad.jpg", [0.7, 0.1, 0.1, 0.1])
    bad = dataclasses.replace(bad, probabilities={"Benign": "high"})  # a model handing back text
    with pytest.raises(ValueError):
        write_report([*preds, bad], out, run)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["report.xlsx", "smears"]
    with pytest.raises(ValueError):
        write_csv([*preds, bad], tmp_path / "report.csv", run)
    assert sorted(os.listdir(tmp_path)) == ["report.xlsx", "smears"]


def test_unwritable_folder_is_a_clear_error(tmp_path, preds, run):
    gone = tmp_path / "gone"
    with pytest.raises(ReportError, match=re.escape(str(gone))):
        write_report(preds, gone / "report.xlsx", run)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ReportError, match=re.escape(str(a_file))):
        write_csv(preds, a_file / "report.csv", run)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "smears"]


@pytest.mark.parametrize("lock", ["~$report.xlsx", "~$port.xlsx", ".~lock.report.xlsx#"])
def test_open_workbook_is_not_overwritten(tmp_path, preds, run, caplog, lock):
    out = tmp_path / "report.xlsx"
    write_report(preds[:2], out, run)
    before = out.read_bytes()
    (tmp_path / lock).write_bytes(b"\x05alice")
    assert locked_target(out)
    with caplog.at_level(logging.WARNING, logger="bcc_desk.report"):
        written = write_report(preds, out, run)
    assert written != out and written.parent == tmp_path and SIBLING.match(written.name)
    assert out.read_bytes() == before
    assert len(sheet_rows(openpyxl.load_workbook(written)["Images"])) == len(preds) + 1
    msg = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msg) == 1 and str(out) in msg[0] and str(written) in msg[0] and lock in msg[0]
    assert sorted(os.listdir(tmp_path)) == sorted(["report.xlsx", lock, written.name, "smears"])


def test_daemon_keeps_one_sibling_while_locked_and_returns_when_closed(tmp_path, preds, run):
    out = tmp_path / "report.xlsx"
    write_report(preds[:1], out, run)
    lock = tmp_path / "~$report.xlsx"
    lock.write_bytes(b"")
    first = write_report(preds[:2], out, run)
    again = write_report(preds, out, run, fallback=first)
    assert again == first
    assert len(sheet_rows(openpyxl.load_workbook(first)["Images"])) == len(preds) + 1
    assert len(os.listdir(tmp_path)) == 4  # report, lock, one sibling, smears
    lock.unlink()
    assert not locked_target(out)
    assert write_report(preds, out, run, fallback=first) == out
    assert len(sheet_rows(openpyxl.load_workbook(out)["Images"])) == len(preds) + 1


def test_target_that_cannot_be_replaced_goes_beside(tmp_path, preds, run, caplog):
    out = tmp_path / "report.xlsx"
    out.mkdir()  # os.replace refuses, as Windows does for a workbook Excel holds open
    (out / "keep").write_text("x")
    with caplog.at_level(logging.WARNING, logger="bcc_desk.report"):
        written = write_report(preds, out, run)
    assert SIBLING.match(written.name)
    assert (out / "keep").read_text() == "x"
    assert any(str(written) in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == sorted(["report.xlsx", written.name, "smears"])


def test_csv_columns_values_and_injection_guard(tmp_path, preds, run):
    out = tmp_path / "report.csv"
    assert write_csv(preds, out, run) == out
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    with open(out, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == IMAGE_COLUMNS(CLASSES)
    files = [r[0] for r in rows[1:]]
    assert files == ["#REF!/x.jpg", "P2/=cmd.jpg", "P2/@SUM(A1).jpg", "P2/blåst-細胞.jpg",
                     "P10/+1.jpg", "P10/-2.jpg", "P10/broken.jpg", "top.jpg"]
    # the guard is about the cell's first character: names inside a slide folder start with "P"
    write_csv([pred(tmp_path, n, [0.7, 0.1, 0.1, 0.1]) for n in ["=cmd.jpg", "@SUM(A1).jpg", "+1.jpg", "-2.jpg"]],
              out, run)
    with open(out, encoding="utf-8-sig", newline="") as fh:
        top = list(csv.reader(fh))
    assert sorted(r[0] for r in top[1:]) == sorted(["'=cmd.jpg", "'@SUM(A1).jpg", "'+1.jpg", "'-2.jpg"])
    assert {r[1] for r in top[1:]} == {tmp_path.name}
    by_file = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    ok = by_file["P10/-2.jpg"]
    assert ok["label"] == "[Malignant] Pre-B" and ok["needs_review"] == "FALSE"
    assert float(ok["confidence"]) == pytest.approx(0.6) and float(ok["margin"]) == pytest.approx(0.4)
    assert [float(ok[f"p: {c}"]) for c in CLASSES] == pytest.approx([0.1, 0.2, 0.6, 0.1])
    assert float(ok["ood_score"]) == pytest.approx(1.25)
    assert ok["classified_at"] == local(AT).strftime("%Y-%m-%d %H:%M:%S")
    assert ok["model"] == MODEL and ok["model_sha256"] == SHA
    assert by_file["P2/@SUM(A1).jpg"]["needs_review"] == "TRUE"
    err = by_file["P10/broken.jpg"]
    assert err["error"] == "cannot identify image file" and err["label"] == err["confidence"] == ""
    assert by_file["#REF!/x.jpg"]["review_reason"] == "low confidence; unlike training data"
    assert sorted(os.listdir(tmp_path)) == ["report.csv", "smears"]


def test_csv_open_in_libreoffice_goes_beside(tmp_path, preds, run, caplog):
    out = tmp_path / "report.csv"
    write_csv(preds[:1], out, run)
    before = out.read_bytes()
    (tmp_path / ".~lock.report.csv#").write_text("alice,host,...")
    with caplog.at_level(logging.WARNING, logger="bcc_desk.report"):
        written = write_csv(preds, out, run)
    assert re.match(r"^report \(\d{4}-\d{2}-\d{2} \d{6}\)\.csv$", written.name)
    assert out.read_bytes() == before
    assert any("open in another program" in r.getMessage() for r in caplog.records)


# --- #36: the report a lab signs -------------------------------------------------------------


def test_slides_sheet_verdict_identity_and_signature(tmp_path, root, run):
    """Each slide's verdict in words, whose slide it is (every cell text, never a formula), who
    signed it; a reviewer's label counts in the verdict instead of the model's."""
    many = [pred(root, f"P1/{i}.jpg", [0.05, 0.05, 0.1, 0.8]) for i in range(9)]
    many.append(pred(root, "P1/odd.jpg", [0.8, 0.1, 0.05, 0.05], reason="disagrees with its slide"))
    few = [pred(root, f"P2/{i}.jpg", [0.8, 0.1, 0.05, 0.05]) for i in range(2)]
    signed_at = datetime(2024, 5, 6, 9, 30, tzinfo=timezone.utc)
    lab = LabRecords(identities={"P1": SlideIdentity("=1+1", "ACC-7", "2024-05-01", "@note")},
                     reviewed={many[-1].path: CLASSES[3]}, signatures={"P1": Signature("dr. b", signed_at)})
    out = write_report(many + few, tmp_path / "report.xlsx", run, lab=lab)
    wb = openpyxl.load_workbook(out)
    ws = wb["Slides"]
    rows = sheet_rows(ws)
    table = {r[0]: dict(zip(rows[0], r)) for r in rows[1:3]}
    p1, p2 = table["P1"], table["P2"]
    assert p1["verdict"] == "[Malignant] Pro-B: 10 of 10 fields (100%, 95% CI 72-100%)"  # the review counted
    assert p1["to review"] is None  # one of ten flagged: not over a tenth
    assert (p1["patient id"], p1["accession"], p1["specimen date"], p1["lab note"]) == ("=1+1", "ACC-7", "2024-05-01", "@note")
    assert (p1["signed by"], p1["signed at"]) == ("dr. b", local(signed_at))
    assert p2["verdict"] == "too few images: 2 classified, at least 5 needed" and p2["signed by"] is None
    assert "too few fields for a call" in p2["to review"]
    assert dict(zip(rows[0], rows[3]))["signed by"] == "1 of 2 signed"
    header = rows[0]
    assert ws.cell(row=2, column=header.index("patient id") + 1).data_type == "s"
    images = sheet_rows(wb["Images"])
    patient = {r[0]: r[images[0].index("patient_id")] for r in images[1:]}
    assert patient["P1/0.jpg"] == "=1+1" and patient["P2/0.jpg"] is None
    run_sheet = {r[0]: r[1] for r in sheet_rows(wb["Run"])[1:]}
    assert (run_sheet["slides"], run_sheet["signed slides"]) == (2, 1)
    assert run_sheet["verdicts"] == DECISION_AID
    with zipfile.ZipFile(out) as z:
        assert not any("<f>" in z.read(n).decode() for n in z.namelist() if n.startswith("xl/worksheets/"))


def test_every_sheet_prints_one_page_wide_with_titles_and_footer(tmp_path, preds, run):
    out = write_report(preds, tmp_path / "report.xlsx", run)
    wb = openpyxl.load_workbook(out)
    for ws in wb.worksheets:
        setup = ws.page_setup
        assert setup.orientation == "landscape" and str(setup.paperSize) == ws.PAPERSIZE_A4, ws.title
        assert ws.sheet_properties.pageSetUpPr.fitToPage and setup.fitToWidth == 1, ws.title
        assert setup.fitToHeight == (1 if ws.title == "Run" else 0), ws.title  # the Run sheet: one page
        if ws.title != "Run":
            assert ws.print_title_rows == "$1:$1", ws.title  # the header row on every page
        assert ws.oddFooter.center.text == "page &P of &N"
        assert ws.oddFooter.left.text == "&F: &A" and MODEL in ws.oddFooter.right.text
    assert wb["Slides"].oddHeader.center.text == DECISION_AID


def test_footer_keeps_a_models_ampersand_as_text(tmp_path, preds, run):
    run.models = [("R&D model", SHA)]
    ws = openpyxl.load_workbook(write_report(preds, tmp_path / "report.xlsx", run))["Images"]
    assert ws.oddFooter.right.text.startswith("R&&D model, ")  # '&D' alone would print the date


def test_interrupted_run_says_so_and_lists_what_was_not_done(tmp_path, preds, run):
    run.not_classified = ["P10/z.jpg", "P2/y.jpg", "P2/=x.jpg"]
    out = write_report(preds, tmp_path / "report.xlsx", run)
    wb = openpyxl.load_workbook(out)
    assert wb.sheetnames == ["Images", "Slides", "Run", "Not classified"]
    f = {r[0]: r[1] for r in sheet_rows(wb["Run"])[1:]}
    assert f["run"] == "interrupted after 8 of 11 images: the rest are on the sheet 'Not classified'"
    assert f["not classified"] == 3
    assert sheet_rows(wb["Not classified"]) == [["file", "slide"], ["P2/=x.jpg", "P2"], ["P2/y.jpg", "P2"], ["P10/z.jpg", "P10"]]
    assert wb["Not classified"]["A2"].data_type == "s"
    run.not_classified = []
    f = {r[0]: r[1] for r in sheet_rows(openpyxl.load_workbook(write_report(preds, out, run))["Run"])[1:]}
    assert f["run"] == "complete" and f["not classified"] == 0


def test_a_report_name_says_its_format(tmp_path, preds, run):
    assert writer_for(tmp_path / "r.XLSX") is write_report and writer_for(tmp_path / "r.csv") is write_csv
    for name in ("r.pdf.xls", "r.txt", "r"):
        with pytest.raises(ValueError, match=r"\.xlsx, \.csv or \.pdf"):
            writer_for(tmp_path / name)
