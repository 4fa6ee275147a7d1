"""DATA/reviews.csv: one row per image imported from a lab's review workbooks
(`trainer/reviews.py`), kept beside the class folders.  The split reads it (the images of one
slide are one group), a fine-tuned bundle's provenance counts its workbooks, and a re-import
checks it so that nothing is added twice.  No other trainer module is imported here."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from bcc_desk.safe_text import csv_plain, csv_text

MANIFEST = "reviews.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path", "class", "sha256", "source", "source_sha256", "root", "file", "slide",
    "model_label", "reviewer_label", "reviewed_by", "reviewed_at", "model", "model_sha256", "imported_at",
)


class ReviewImportError(ValueError):
    """A workbook that cannot be imported; the message is one line naming the workbook and row."""


def read_manifest(data: Path) -> list[dict[str, str]]:
    """The rows of DATA/reviews.csv (none when there is no manifest)."""
    path = Path(data) / MANIFEST
    if not path.is_file():
        return []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                raise ReviewImportError(f"{path} is not a review manifest: expected the columns {','.join(MANIFEST_COLUMNS)}")
            return [{k: csv_plain(v or "") for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReviewImportError(f"cannot read {path}: {exc}") from None


def manifest_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for row in rows:
        # A lab opens this in Excel too: no cell may start a formula.
        writer.writerow([csv_text(row.get(c, "")) for c in MANIFEST_COLUMNS])
    return buf.getvalue()


def slide_keys(data: Path, rel_paths: list[str]) -> list[str | None]:
    """Per image of DATA (relative posix paths), the slide it came from when the manifest knows
    it (the images' folder and slide: one slide is one patient), else None."""
    by_path = {row["path"]: f"{row['root']}\t{row['slide']}" for row in read_manifest(data) if row.get("slide")}
    return [by_path.get(p) for p in rel_paths]
