"""What a lab records about a slide besides its images: whose it is (`slides.csv`) and who signed
it.  Both reach every sheet and page that shows the slide.

`slides.csv` sits beside the slide folders (in the folder `bcc classify`, `bcc watch` or the app
is given), one row per slide folder::

    slide,patient_id,accession,specimen_date,note
    patient-07,P-2291,ACC-88812,2026-11-30,bone marrow aspirate

`slide` is the folder's name relative to that folder, as the report's slide column spells it;
`specimen_date` is a date as YYYY-MM-DD (or empty); every other column is free text.  The file is
optional; a bad one is refused with one line naming its row.  The app writes it back when a
person edits a slide's identity, every cell formula-safe (`csv_text`), since labs open it in Excel.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from pathlib import Path

from bcc_desk.safe_text import csv_plain, csv_text
from bcc_desk.slides import natural_key

SLIDES_CSV = "slides.csv"
COLUMNS = ("slide", "patient_id", "accession", "specimen_date", "note")
MAX_CHARS = 200
"""Longer than any identifier or short note: a longer cell is a wrong file, not an identity."""


class SlidesFileError(ValueError):
    """`slides.csv` cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class SlideIdentity:
    """Whose slide it is.  Every field is text as the lab typed it ('' when not given)."""

    patient_id: str = ""
    accession: str = ""
    specimen_date: str = ""
    """YYYY-MM-DD, or ''."""
    note: str = ""

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def items(self) -> list[tuple[str, str]]:
        """(heading, value) in the order a report shows them."""
        return [("patient id", self.patient_id), ("accession", self.accession),
                ("specimen date", self.specimen_date), ("lab note", self.note)]


NO_IDENTITY = SlideIdentity()
IDENTITY_HEADINGS = tuple(h for h, _ in NO_IDENTITY.items())


@dataclass(frozen=True)
class Signature:
    """A reviewer's sign-off of a slide: who and when."""

    by: str
    at: datetime


@dataclass(frozen=True)
class LabRecords:
    """What the lab added to the model's output, as a report shows it: the slides' identities,
    the labels people gave (a reviewed image counts under its reviewer's label) and the slides
    signed.  Copied whole into an export, so a report written on another thread is not changed
    by edits made meanwhile."""

    identities: Mapping[str, SlideIdentity] = field(default_factory=dict)
    reviewed: Mapping[Path, str] = field(default_factory=dict)
    """Image path -> the label a person gave it."""
    signatures: Mapping[str, Signature] = field(default_factory=dict)
    lab_name: str = ""
    """The lab's name for the PDF's header (a setting: `--lab-name` / BCC_LAB_NAME, the app's)."""

    def identity(self, slide: str) -> SlideIdentity:
        return self.identities.get(slide, NO_IDENTITY)


def checked_identity(identity: SlideIdentity) -> SlideIdentity:
    """`identity` with its fields stripped, or SlidesFileError saying which field is wrong."""
    values = {f.name: " ".join(str(getattr(identity, f.name)).split()) for f in fields(identity)}
    for name, value in values.items():
        if len(value) > MAX_CHARS:
            raise SlidesFileError(f"{name} is {len(value)} characters long (at most {MAX_CHARS})")
    if values["specimen_date"]:
        try:
            date.fromisoformat(values["specimen_date"])
        except ValueError:
            raise SlidesFileError(f"specimen_date {values['specimen_date']!r} is not a date as YYYY-MM-DD") from None
    return SlideIdentity(**values)


def read_slides_csv(folder: Path) -> dict[str, SlideIdentity]:
    """The identities in `folder`/slides.csv by slide name ({} when there is no such file).
    Raises SlidesFileError with one line naming the file and row for anything it cannot use."""
    path = Path(folder) / SLIDES_CSV
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SlidesFileError(f"{path}: cannot be read ({exc})") from None
    if not rows:
        return {}
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in COLUMNS[:1] if c not in header]
    unknown = [h for h in header if h and h not in COLUMNS]
    if missing or unknown:
        raise SlidesFileError(f"{path}: row 1 must name the columns {', '.join(COLUMNS)} (slide first; "
                              f"{'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(unknown)})")
    out: dict[str, SlideIdentity] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise SlidesFileError(f"{path}: row {number} has {len(row)} cells, the header {len(header)}")
        cells = dict(zip(header, (csv_plain(c.strip()) for c in row), strict=False))
        slide = cells.get("slide", "").replace("\\", "/").strip("/")
        if not slide:
            raise SlidesFileError(f"{path}: row {number} names no slide")
        if slide in out:
            raise SlidesFileError(f"{path}: row {number} names slide {slide!r} a second time")
        try:
            out[slide] = checked_identity(SlideIdentity(**{c: cells.get(c, "") for c in COLUMNS[1:]}))
        except SlidesFileError as exc:
            raise SlidesFileError(f"{path}: row {number}: {exc}") from None
    return out


def write_slides_csv(folder: Path, identities: Mapping[str, SlideIdentity]) -> Path:
    """Write `identities` to `folder`/slides.csv (slides without any field left out), through a
    temporary file so that a failure leaves the old file as it was.  Raises OSError."""
    path = Path(folder) / SLIDES_CSV
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".slides.", suffix=".csv")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            for slide in sorted(identities, key=natural_key):
                ident = identities[slide]
                if ident:
                    # opened in Excel by the lab: a patient id such as "=1+1" must stay text
                    writer.writerow([csv_text(v) for v in (slide, ident.patient_id, ident.accession, ident.specimen_date, ident.note)])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
