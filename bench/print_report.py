"""The report on paper (issue #36): a folder of 8 slides (about 250 real images) classified by
`bcc classify --pdf`, the workbook printed by LibreOffice headless, and both PDFs read back.

Checks what a lab sees: the workbook's page count (at most 12), the header row and the footer on
every printed page, the Run sheet on one page; the PDF report's page per slide with its verdict
and patient id.  Needs LibreOffice (`soffice`) and poppler's `pdftoppm` for the page images.

    python bench/print_report.py [--data ../shared/data/all4] [--out /tmp/print8] [--write]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

from pypdf import PdfReader

from common import ALL4, cpu_name, publish

SLIDES = 8
PER_SLIDE = 31  # 248 images
HEADER_WORDS = {"Images": ("file", "label", "needs_review"), "Slides": ("slide", "verdict", "flagged"),
                "Not classified": ("file", "slide")}


def build_folder(data: Path, root: Path) -> Path:
    """8 slide folders, two per class, each of 31 consecutive real images of its class (one
    patient's slide holds one diagnosis), and a slides.csv naming their patients."""
    if root.exists():
        shutil.rmtree(root)
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    rows = []
    for k in range(SLIDES):
        cls = classes[k % len(classes)]
        files = sorted(cls.glob("*.jpg"))
        start = (k // len(classes)) * 200 + 50
        slide = root / f"patient-{k + 1:02d}"
        slide.mkdir(parents=True)
        for f in files[start:start + PER_SLIDE]:
            (slide / f.name).hardlink_to(f)
        rows.append([slide.name, f"P-{1000 + k}", f"ACC-{77000 + k}", date(2026, 12, 1).isoformat(), ""])
    with (root / "slides.csv").open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["slide", "patient_id", "accession", "specimen_date", "note"], *rows])
    return root


def printed(xlsx: Path, out: Path) -> Path:
    """The workbook as LibreOffice prints it (every sheet, its own page setup), as a PDF."""
    profile = out / "lo-profile"  # a private profile: no first-start dialogs, no clash with a running one
    subprocess.run(["soffice", f"-env:UserInstallation=file://{profile}", "--headless", "--convert-to", "pdf",
                    "--outdir", str(out), str(xlsx)], check=True, capture_output=True, timeout=300)
    return out / (xlsx.stem + ".pdf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ALL4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/print8"))
    ap.add_argument("--model", type=Path, help="bundle (default: the shipped model)")
    ap.add_argument("--write", action="store_true", help="add the figures to bench/RESULTS.md")
    args = ap.parse_args()
    root = build_folder(args.data, args.out / "export")
    report = args.out / "bcc-report.xlsx"
    cmd = [sys.executable, "-m", "bcc_desk", "classify", str(root), "-o", str(report), "--pdf", "-q",
           "--lab-name", "Haematology laboratory"]
    if args.model:
        cmd += ["-m", str(args.model)]
    subprocess.run(cmd, check=True)
    sheets_pdf = printed(report, args.out / "printed")  # its own folder: LibreOffice names it bcc-report.pdf too
    pages = [p.extract_text() for p in PdfReader(sheets_pdf).pages]
    per_sheet: dict[str, int] = {}
    problems = []
    for i, text in enumerate(pages, start=1):
        sheet = next((s for s in ("Images", "Slides", "Run", "Not classified") if f"bcc-report.xlsx: {s}" in text), None)
        if sheet is None or f"page {i} of {len(pages)}" not in text:
            problems.append(f"page {i}: no footer")
            continue
        per_sheet[sheet] = per_sheet.get(sheet, 0) + 1
        if not all(w in text for w in HEADER_WORDS.get(sheet, ("field", "value"))):
            problems.append(f"page {i} ({sheet}): no header row")
    pdf = PdfReader(report.with_suffix(".pdf"))
    slide_pages = [p.extract_text() for p in pdf.pages]
    found = sum(any(f"P-{1000 + k}" in t and "fields" in t for t in slide_pages) for k in range(SLIDES))
    lines = [
        f"### The printed report, {date.today().isoformat()}",
        "",
        f"Machine: {cpu_name()}. {SLIDES} slides, {SLIDES * PER_SLIDE} real images (`bench/print_report.py`), "
        "`bcc classify --pdf`, the workbook printed by LibreOffice headless (A4).",
        "",
        "| output | pages | check |",
        "|---|---:|---|",
        f"| workbook, printed | {len(pages)} ({', '.join(f'{k} {v}' for k, v in per_sheet.items())}) | "
        f"{'header row and footer on every page' if not problems else '; '.join(problems)} |",
        f"| PDF report | {len(slide_pages)} | verdict and patient id found on {found} of {SLIDES} slides' pages |",
        "",
        f"Done when (#36): workbook at most 12 pages: {'met' if len(pages) <= 12 else 'NOT met'}; "
        f"Run sheet one page: {'met' if per_sheet.get('Run') == 1 else 'NOT met'}; "
        f"every page with header row and footer: {'met' if not problems else 'NOT met'}.",
    ]
    if shutil.which("pdftoppm"):
        subprocess.run(["pdftoppm", "-png", "-r", "70", "-f", "1", "-l", "1", str(report.with_suffix(".pdf")),
                        str(args.out / "pdf-page")], check=True)
        subprocess.run(["pdftoppm", "-png", "-r", "70", str(sheets_pdf), str(args.out / "sheet")], check=True)
    publish("\n".join(lines), args.write, section="## The report a lab signs")


if __name__ == "__main__":
    main()
