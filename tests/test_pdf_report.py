"""The PDF report: real PDFs written to tmp_path from real smear images, read back with pypdf
(page by page: what a reader of one slide's page sees)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pypdf import PdfReader
from pypdf.generic import ContentStream

from bcc_desk import __version__
from bcc_desk.lab_records import LabRecords, Signature, SlideIdentity
from bcc_desk.pdf_report import write_pdf
from bcc_desk.prediction import Prediction, error_prediction, relative_location
from bcc_desk.report_file import ReportError
from bcc_desk.run_record import RunInfo
from bcc_desk.verdict import DECISION_AID

from conftest import ALL4, CLASSES

MODEL, SHA = "convnext_tiny-all4", "ab" * 32
AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=5)))


def pred(root: Path, rel: str, label: int, confidence: float, reason: str = "") -> Prediction:
    path = root / rel
    file, slide = relative_location(path, root)
    probs = {c: (confidence if i == label else (1 - confidence) / 3) for i, c in enumerate(CLASSES)}
    return Prediction(path=path, file=file, slide=slide, label=CLASSES[label], confidence=confidence, margin=0.1,
                      probabilities=probs, needs_review=bool(reason), review_reason=reason, error=None, model=MODEL,
                      model_sha256=SHA, classified_at=AT)


def run_info(root: Path, not_classified: list[str] | None = None) -> RunInfo:
    return RunInfo(software_version=__version__, models=[(MODEL, SHA)], classes=CLASSES, review_threshold=0.6,
                   ood_check="on", tta=False, device="cpu", started=datetime(2024, 5, 6, 7, 0, tzinfo=timezone.utc),
                   finished=datetime(2024, 5, 6, 7, 1, tzinfo=timezone.utc), root=str(root), host="lab-pc", user="tech",
                   command="bcc classify smears", not_classified=list(not_classified or []))


def copy_images(root: Path, slide: str, class_folder: str, n: int, start: int = 0) -> list[str]:
    """`n` real images of one class into root/slide; their paths relative to root."""
    (root / slide).mkdir(parents=True, exist_ok=True)
    names = []
    for src in sorted((ALL4 / class_folder).glob("*.jpg"))[start:start + n]:
        shutil.copy(src, root / slide / src.name)
        names.append(f"{slide}/{src.name}")
    return names


def pages(pdf: Path) -> list[str]:
    """The text of each page, laid out in lines as a reader sees them."""
    return [page.extract_text(extraction_mode="layout") for page in PdfReader(pdf).pages]


def page_count(pdf: Path) -> int:
    return len(PdfReader(pdf).pages)


def images_per_page(pdf: Path) -> dict[int, int]:
    """Pictures drawn on each page (1-based), counted where they are placed: reportlab stores a
    picture used twice (byte-identical images) once."""
    counts: dict[int, int] = {}
    for number, page in enumerate(PdfReader(pdf).pages, start=1):
        xobjects = page["/Resources"].get("/XObject", {}) if "/Resources" in page else {}
        images = {name for name, ref in xobjects.items() if ref.get_object().get("/Subtype") == "/Image"}
        drawn = sum(1 for operands, op in ContentStream(page.get_contents(), page.pdf).operations
                    if op == b"Do" and operands[0] in images)
        if drawn:
            counts[number] = drawn
    return counts


def slide_pages(texts: list[str], slide: str) -> list[int]:
    """The pages whose header names `slide` (its title line, so P2 is not P20)."""
    return [i for i, t in enumerate(texts) if re.search(rf"^\s*Slide {re.escape(slide)}\s*$", t, re.M)]


@pytest.fixture
def smears(tmp_path: Path) -> tuple[Path, list[Prediction], LabRecords]:
    """Two slides of real images: P2 mostly Pro-B with two flagged fields and one unreadable file;
    P10 Benign with one flagged field, signed."""
    root = tmp_path / "smears"
    p2 = copy_images(root, "P2", CLASSES[3], 8)
    p10 = copy_images(root, "P10", CLASSES[0], 6)
    preds = [pred(root, f, 3, 0.95) for f in p2[:6]]
    preds += [pred(root, p2[6], 3, 0.41, "low confidence"), pred(root, p2[7], 1, 0.7, "disagrees with its slide")]
    preds.append(error_prediction(root / "P2" / "broken.jpg", root, "truncated image data", MODEL, SHA))
    preds += [pred(root, f, 0, 0.9) for f in p10[:5]] + [pred(root, p10[5], 0, 0.5, "low confidence")]
    lab = LabRecords(identities={"P2": SlideIdentity("PAT-0002", "ACC-22", "2024-05-01", "bone marrow"),
                                 "P10": SlideIdentity("PAT-0010", "", "", "")},
                     signatures={"P10": Signature("Dr Rossi", datetime(2024, 5, 7, 9, 30))})
    return root, preds, lab


def test_each_slide_has_its_own_pages_with_its_verdict_and_identity(smears, tmp_path: Path) -> None:
    root, preds, lab = smears
    out = write_pdf(preds, tmp_path / "report.pdf", run_info(root), lab=dataclasses.replace(lab, lab_name="City Hospital Haematology"))
    assert out == tmp_path / "report.pdf"
    texts = pages(out)
    assert len(texts) == page_count(out) >= 2
    p2, p10 = slide_pages(texts, "P2"), slide_pages(texts, "P10")
    assert p2 and p10 and p2[-1] < p10[0], "a slide per section, in natural order (P2 before P10)"
    for i in p2:
        assert "PAT-0002" in texts[i] and "ACC-22" in texts[i] and "PAT-0010" not in texts[i]
    for i in p10:
        assert "PAT-0010" in texts[i] and "PAT-0002" not in texts[i]
        assert "accession: \u2014" in texts[i], "an empty identity field shows as a dash"
    flat_p2 = " ".join(texts[p2[0]].split())
    assert "[Malignant] Pro-B: 7 of 8 fields (88%, 95% CI" in flat_p2
    assert "To review:" in flat_p2 and "3 of 9 fields flagged" in flat_p2
    assert "bone marrow" in flat_p2
    assert "City Hospital Haematology" in texts[0] and "bcc-desk report" in texts[0]


def test_every_flagged_field_is_in_its_slides_gallery_with_a_thumbnail(smears, tmp_path: Path) -> None:
    root, preds, lab = smears
    out = write_pdf(preds, tmp_path / "report.pdf", run_info(root), lab=lab)
    texts = pages(out)
    by_slide = {s: " ".join(texts[i] for i in slide_pages(texts, s)) for s in ("P2", "P10")}
    for p in preds:
        name = Path(p.file).name
        if p.needs_review and p.error is None:
            assert name in by_slide[p.slide], name
            assert name not in by_slide["P10" if p.slide == "P2" else "P2"]
        elif p.error is None:
            assert name not in by_slide[p.slide], f"{name} is not flagged: no place in the gallery"
    assert "broken.jpg" in by_slide["P2"] and "truncated image data" in by_slide["P2"]
    assert "41%" in by_slide["P2"] and "low confidence" in by_slide["P2"]
    images = images_per_page(out)
    assert sum(images.get(i + 1, 0) for i in slide_pages(texts, "P2")) == 2  # the unreadable one has none
    assert sum(images.get(i + 1, 0) for i in slide_pages(texts, "P10")) == 1


def test_a_long_gallery_flows_over_pages_and_every_page_is_numbered_with_the_decision_aid(tmp_path: Path) -> None:
    root = tmp_path / "smears"
    files = copy_images(root, "S1", CLASSES[2], 30)
    preds = [pred(root, f, 2, 0.5, "low confidence") for f in files]
    out = write_pdf(preds, tmp_path / "report.pdf", run_info(root))
    texts = pages(out)
    assert len(texts) >= 2
    assert sum(images_per_page(out).values()) == 30
    for number, text in enumerate(texts, start=1):
        assert f"page {number} of {len(texts)}" in text
        assert DECISION_AID in text
        assert "Slide S1" in text, "a continuation page still names its slide"
        assert f"bcc-desk {__version__}" in text and SHA[:12] in text
    assert all(Path(f).name in " ".join(texts) for f in files)
    assert SHA in " ".join("".join(texts).split()), "the full sha256 is in the section"


def test_markup_in_names_prints_literally(tmp_path: Path) -> None:
    root = tmp_path / "smears"
    slide = "<b>x</b> & <font size=90>"
    files = copy_images(root, slide, CLASSES[0], 2)
    (root / files[1]).rename(root / slide / "<i>f&amp;.jpg")  # a file name is outside text too
    files[1] = f"{slide}/<i>f&amp;.jpg"
    preds = [pred(root, f, 0, 0.5, "low confidence; <u>odd</u>") for f in files]
    lab = LabRecords(identities={slide: SlideIdentity("<i>P&1</i>", "A&amp;B", "", "<font size=90>big</font>")},
                     reviewed={preds[0].path: "<b>Benign</b>"},
                     signatures={slide: Signature("<b>Dr</b> & co", datetime(2024, 5, 7, 9, 30))})
    text = " ".join(pages(write_pdf(preds, tmp_path / "r.pdf", run_info(root), lab=dataclasses.replace(lab, lab_name="Lab <b>&"))))
    for literal in (slide, "<i>P&1</i>", "A&amp;B", "<font size=90>big</font>", "Signed by <b>Dr</b> & co", "Lab <b>&",
                    "<i>f&amp;.jpg", "<u>odd</u>", "reviewer: <b>Benign</b>"):
        assert literal in text, literal


def test_a_long_patient_id_is_cut_without_hiding_the_rest_of_the_header(tmp_path: Path) -> None:
    root = tmp_path / "smears"
    slide = "S" * 150 + "/" + "T" * 150  # a slide folder nested two deep: longer than a page is wide
    files = copy_images(root, slide, CLASSES[0], 1)
    lab = LabRecords(identities={slide: SlideIdentity("P" * 200, "ACC-9", "2024-01-02", "")})
    header = pages(write_pdf([pred(root, files[0], 0, 0.9)], tmp_path / "r.pdf", run_info(root), lab=lab))[0].split("\n")[:4]
    line = next(h for h in header if "patient id" in h)
    assert "PPPP\u2026" in line and "accession: ACC-9" in line and "specimen date: 2024-01-02" in line
    assert any("SSSS\u2026" in h for h in header), "the slide's name is cut to the page, not run off it"


def test_signed_slide_names_its_signer_and_unsigned_slide_leaves_a_line_to_sign(smears, tmp_path: Path) -> None:
    root, preds, lab = smears
    texts = pages(write_pdf(preds, tmp_path / "report.pdf", run_info(root), lab=lab))
    p2 = " ".join(texts[i] for i in slide_pages(texts, "P2"))
    p10 = " ".join(texts[i] for i in slide_pages(texts, "P10"))
    assert "Signed by Dr Rossi at 2024-05-07 09:30" in p10 and "Reviewed and signed by: ____" not in p10
    assert "Reviewed and signed by: ____" in p2 and "Date: ____" in p2 and "Signed by" not in p2


def test_reviewers_labels_count_in_the_verdict(smears, tmp_path: Path) -> None:
    root, preds, lab = smears
    reviewed = {p.path: CLASSES[3] for p in preds if p.slide == "P2" and p.label == CLASSES[1]}
    lab = LabRecords(identities=lab.identities, reviewed=reviewed, signatures=lab.signatures)
    texts = pages(write_pdf(preds, tmp_path / "report.pdf", run_info(root), lab=lab))
    flat = " ".join(" ".join(texts[i] for i in slide_pages(texts, "P2")).split())
    assert "[Malignant] Pro-B: 8 of 8 fields" in flat and "reviewer: [Malignant] Pro-B" in flat


def test_an_image_gone_since_the_run_gets_a_placeholder(smears, tmp_path: Path) -> None:
    root, preds, lab = smears
    flagged = [p for p in preds if p.needs_review and p.error is None]
    flagged[0].path.unlink()
    out = write_pdf(preds, tmp_path / "report.pdf", run_info(root), lab=lab)
    text = " ".join(" ".join(pages(out)).split())
    assert "image not available" in text and Path(flagged[0].file).name in text
    assert sum(images_per_page(out).values()) == len(flagged) - 1


def test_an_interrupted_run_says_so_on_every_page_and_lists_the_rest(smears, tmp_path: Path) -> None:
    root, preds, lab = smears
    missing = ["P2/late-1.jpg", "P10/late-2.jpg", "P3/late-3.jpg"]
    texts = pages(write_pdf(preds, tmp_path / "report.pdf", run_info(root, missing), lab=lab))
    n = len(preds)
    for text in texts:
        assert f"interrupted after {n} of {n + 3} images; 3 images were not classified" in text
    assert "Not classified" in texts[-1] and all(f in texts[-1] for f in missing)


def test_no_predictions_still_give_a_valid_one_page_pdf(tmp_path: Path) -> None:
    out = write_pdf([], tmp_path / "empty.pdf", run_info(tmp_path))
    assert out.read_bytes().startswith(b"%PDF-") and page_count(out) == 1
    texts = pages(out)
    assert len(texts) == 1 and "No image was classified" in texts[0] and "page 1 of 1" in texts[0]
    assert DECISION_AID in texts[0]


def test_non_latin_names_do_not_break_the_pdf(tmp_path: Path) -> None:
    # Helvetica has no CJK glyphs: they may print as boxes, but the report must be written.
    root = tmp_path / "smears"
    files = copy_images(root, "blåst-細胞", CLASSES[1], 2)
    preds = [pred(root, files[0], 1, 0.5, "low confidence"), pred(root, files[1], 1, 0.9)]
    lab = LabRecords(identities={"blåst-細胞": SlideIdentity("患者-7", "", "", "ñ ü ß")},
                     signatures={"blåst-細胞": Signature("Dr Łukasz 李", datetime(2024, 5, 7, 9, 30))})
    out = write_pdf(preds, tmp_path / "r.pdf", run_info(root), lab=dataclasses.replace(lab, lab_name="Labor Zürich 実験室"))
    assert out.read_bytes().startswith(b"%PDF-") and page_count(out) == 1
    assert "blåst-" in pages(out)[0] and "ñ ü ß" in pages(out)[0]


def test_the_pdf_is_written_atomically_and_beside_a_locked_target(tmp_path: Path) -> None:
    target = tmp_path / "report.pdf"
    target.write_bytes(b"old")
    (tmp_path / ".~lock.report.pdf#").write_text("someone")
    out = write_pdf([], target, run_info(tmp_path))
    assert out != target and out.parent == tmp_path and target.read_bytes() == b"old"
    assert out.read_bytes().startswith(b"%PDF-")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")], "no temporary file left behind"
    with pytest.raises(ReportError):
        write_pdf([], tmp_path / "missing" / "report.pdf", run_info(tmp_path))
