"""slides.csv (#36): a lab's identities for its slides, read and written back safely."""

from __future__ import annotations

from pathlib import Path

import pytest

from bcc_desk.lab_records import SLIDES_CSV, SlideIdentity, SlidesFileError, read_slides_csv, write_slides_csv


def write(folder: Path, text: str, encoding: str = "utf-8") -> Path:
    (folder / SLIDES_CSV).write_text(text, encoding=encoding)
    return folder


def test_read_as_a_lab_writes_it(tmp_path):
    # Excel's "CSV UTF-8" adds a BOM; headers in any case; blank lines and missing columns are fine
    write(tmp_path, "Slide,Patient_ID,accession,specimen_date,note\r\n"
                    "patient-07,P-2291,ACC-88812,2026-11-30,  bone  marrow \r\n\r\n"
                    "sub\\slide-2,P-1,,,\r\n", encoding="utf-8-sig")
    got = read_slides_csv(tmp_path)
    assert got == {"patient-07": SlideIdentity("P-2291", "ACC-88812", "2026-11-30", "bone marrow"),
                   "sub/slide-2": SlideIdentity("P-1")}
    write(tmp_path, "slide,patient_id\ns1,A\n")
    assert read_slides_csv(tmp_path) == {"s1": SlideIdentity("A")}
    assert read_slides_csv(tmp_path / "none") == {}  # the file is optional


@pytest.mark.parametrize(("text", "message"), [
    ("patient,accession\np,a\n", r"row 1 must name the columns .*missing slide"),
    ("slide,patient_id,ward\ns,p,w\n", r"row 1 .*unknown ward"),
    ("slide,patient_id\ns1,a\ns1,b\n", r"row 3 names slide 's1' a second time"),
    ("slide,patient_id\n,a\n", r"row 2 names no slide"),
    ("slide,patient_id,accession,specimen_date\ns1,a,b,30/11/2026\n", r"row 2: specimen_date '30/11/2026' is not a date"),
    ("slide,patient_id\ns1,a,extra\n", r"row 2 has 3 cells, the header 2"),
    ("slide,patient_id\ns1," + "x" * 201 + "\n", r"row 2: patient_id is 201 characters long"),
])
def test_a_bad_file_is_one_line_naming_the_row(tmp_path, text, message):
    write(tmp_path, text)
    with pytest.raises(SlidesFileError, match=message) as info:
        read_slides_csv(tmp_path)
    assert "\n" not in str(info.value) and SLIDES_CSV in str(info.value)


def test_not_utf8_is_refused_in_one_line(tmp_path):
    (tmp_path / SLIDES_CSV).write_bytes("slide,patient_id\ns1,Müller\n".encode("utf-16"))
    with pytest.raises(SlidesFileError, match="cannot be read"):
        read_slides_csv(tmp_path)


def test_written_back_formula_safe_and_read_back_the_same(tmp_path):
    identities = {"s10": SlideIdentity("=HYPERLINK(\"x\")", "+1", "2026-01-02", "@cmd"), "s2": SlideIdentity("P"),
                  "empty": SlideIdentity()}
    path = write_slides_csv(tmp_path, identities)
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[1] == "s2,P,,,"  # natural order; a slide with nothing is left out
    assert "'=HYPERLINK" in text and "'+1" in text and "'@cmd" in text  # Excel shows text, runs nothing
    assert read_slides_csv(tmp_path) == {k: v for k, v in identities.items() if v}
    assert [p.name for p in tmp_path.iterdir()] == [SLIDES_CSV]  # no temporary file left
