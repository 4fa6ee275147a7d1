"""`bcc-train import-reviews`: the labels a person gave in the desktop app (or typed into a
`bcc classify` report's `reviewer label` column) become training images.

Each reviewed image is copied into `DATA/<class>/` under a name made from its content hash, and
one row per image goes to the manifest `DATA/reviews.csv` (which workbook, file, slide, the
model's and the reviewer's label, who, when, sha256).  The manifest is what makes an import
idempotent (an image whose sha256 is already there is not added again), what makes splits
slide-aware (`slide_keys`: one slide is one patient) and what a fine-tuned bundle's provenance
names.  The originals are only read.

All or nothing: every workbook named is read and checked (columns, classes, images present and
readable, no formulas where a file name belongs) before the first image is copied, and a copy
that fails removes what this import copied, so a bad row never leaves a half-imported workbook.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from zipfile import BadZipFile, ZipFile

from bcc_desk.bundle import BundleMeta, display_name
from bcc_desk.files import file_sha256, write_text_atomic
from bcc_desk.images import ImageReadError, is_candidate, open_image
from bcc_desk.report import REVIEW_COLUMNS
from trainer.dataset import list_dataset
from trainer.manifest import MANIFEST, ReviewImportError, manifest_text, read_manifest

__all__ = ["ImportSummary", "ReviewImportError", "import_reviews", "read_workbook"]

_LABEL, _BY, _AT = REVIEW_COLUMNS
MAX_WORKBOOK_BYTES = 200 * 2**20
"""A review export of tens of thousands of rows is a few MB; more is not one of ours."""
MAX_UNPACKED_BYTES = 512 * 2**20
"""What its parts may inflate to (a zip bomb of 4 MB inflated to 4 GB and ended in MemoryError)."""


@dataclass(frozen=True)
class Reviewed:
    """One row of a workbook with a reviewer's label."""

    row: int
    file: str
    slide: str
    model_label: str
    reviewer_label: str
    reviewed_by: str
    reviewed_at: str
    image: Path
    """Where the original lies (the workbook's root joined with `file`)."""


@dataclass
class Workbook:
    path: Path
    sha256: str
    root: Path
    classes: list[str]
    """The model's class names from the Run sheet (empty when the workbook has no Run sheet)."""
    model: str
    model_sha256: str
    rows: list[Reviewed]
    unreviewed: int


@dataclass
class ImportSummary:
    """What one import did, per DATA class folder."""

    added: Counter = field(default_factory=Counter)
    corrections: Counter = field(default_factory=Counter)
    """Added images whose reviewer's label differs from the model's."""
    already: Counter = field(default_factory=Counter)
    """Reviewed images whose content was already imported (an idempotent re-import)."""
    unreviewed: int = 0
    workbooks: int = 0

    @property
    def total_added(self) -> int:
        return sum(self.added.values())


# -- reading a workbook --------------------------------------------------------------------------
def read_workbook(path: Path, images: Path | None = None) -> Workbook:
    """The reviewed rows of an exported workbook, each image found and checked readable.

    `images` overrides the folder the Run sheet's `root` names (the images moved since)."""
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    path = Path(path)
    where = path.name
    if path.suffix.lower() != ".xlsx":
        raise ReviewImportError(f"{where}: not an .xlsx workbook (export the reviews from bcc-desk as .xlsx)")
    _check_size(path, where)
    try:
        wb = load_workbook(path, read_only=True, data_only=False)
    except FileNotFoundError:
        raise ReviewImportError(f"{where}: no such file") from None
    except (OSError, InvalidFileException, BadZipFile, KeyError, ValueError) as exc:
        raise ReviewImportError(f"{where}: not a readable Excel workbook ({type(exc).__name__})") from None
    try:
        sheet = wb["Images"] if "Images" in wb.sheetnames else wb.worksheets[0]
        rows = sheet.iter_rows()
        header = [_text(c) for c in next(rows, ())]
        run = _run_fields(wb) if "Run" in wb.sheetnames else {}
        col = {name.strip().casefold(): i for i, name in enumerate(header) if name}
        for needed in ("file", "label", _LABEL):
            if needed not in col:
                raise ReviewImportError(
                    f"{where} has no {needed!r} column: export it from bcc-desk (File > Export), or add a "
                    f"{_LABEL!r} column to a bcc classify report"
                )
        root = Path(images) if images is not None else Path(run["root"]) if run.get("root") else None
        if root is None:
            raise ReviewImportError(f"{where} has no Run sheet naming the images' folder: give it with --images")
        if not root.is_dir():
            raise ReviewImportError(f"{where}: the images' folder {root} is not there (give it with --images)")
        classes = [c.strip() for c in run.get("classes", "").split(";") if c.strip()]
        reviewed, unreviewed = [], 0
        for r, cells in enumerate(rows, start=2):
            cells = list(cells)

            def get(name: str, cells=cells, r=r) -> str:
                i = col.get(name.casefold())
                if i is None or i >= len(cells):
                    return ""
                if cells[i].data_type == "f":  # an edited cell that Excel would compute, not a name
                    raise ReviewImportError(f"{where}, row {r}: the {name!r} cell is a formula, not text")
                return _text(cells[i])

            label = get(_LABEL)
            if not label:
                unreviewed += 1 if get("file") else 0
                continue
            file = get("file")
            if not file:
                raise ReviewImportError(f"{where}, row {r}: a {_LABEL!r} without a file name")
            image = root / file
            reviewed.append(
                Reviewed(r, file, get("slide"), get("label"), label, get(_BY), get(_AT), image)
            )
    finally:
        wb.close()
    for item in reviewed:
        _check_image(where, item)
    return Workbook(path, file_sha256(path), root.absolute(), classes, run.get("model", run.get("model 1", "")),
                    run.get("model sha256", run.get("model 1 sha256", "")), reviewed, unreviewed)


def _check_size(path: Path, where: str) -> None:
    """A regular file (a FIFO named .xlsx would block the read forever) of a workbook's size,
    whose parts do not inflate past MAX_UNPACKED_BYTES: checked before any parsing."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ReviewImportError(f"{where}: no such file") from None
    except OSError as exc:
        raise ReviewImportError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ReviewImportError(f"{where}: not a regular file (a pipe, a device or a folder)")
    if info.st_size > MAX_WORKBOOK_BYTES:
        raise ReviewImportError(f"{where}: {info.st_size:,} bytes, larger than any review export "
                                f"({MAX_WORKBOOK_BYTES // 2**20} MB at most)")
    try:
        with ZipFile(path) as archive:
            unpacked = sum(item.file_size for item in archive.infolist())
    except (BadZipFile, OSError, ValueError) as exc:
        raise ReviewImportError(f"{where}: not a readable Excel workbook ({type(exc).__name__})") from None
    if unpacked > MAX_UNPACKED_BYTES:
        raise ReviewImportError(f"{where}: its parts inflate to {unpacked:,} bytes, more than any review export "
                                f"({MAX_UNPACKED_BYTES // 2**20} MB at most); not read")


def _run_fields(wb) -> dict[str, str]:
    """The Run sheet's field -> value (as text)."""
    fields: dict[str, str] = {}
    for cells in wb["Run"].iter_rows(min_row=2, max_col=2):
        if len(cells) == 2 and cells[0].value is not None:
            fields[_text(cells[0]).casefold()] = _text(cells[1])
    return fields


def _text(cell) -> str:
    value = getattr(cell, "value", None)
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value).strip()


def _check_image(where: str, item: Reviewed) -> None:
    if not is_candidate(PurePosixPath(item.file)):
        raise ReviewImportError(f"{where}, row {item.row}: {item.file!r} is not an image file name")
    if not item.image.is_file():
        raise ReviewImportError(f"{where}, row {item.row}: the reviewed image {item.file} is no longer in {item.image.parent}")
    try:
        open_image(item.image, reduce_to=64)
    except ImageReadError as exc:
        raise ReviewImportError(f"{where}, row {item.row}: {item.file} cannot be read ({exc})") from None


# -- classes -------------------------------------------------------------------------------------
def _class_folders(data: Path) -> list[str]:
    if not data.is_dir():
        return []
    try:
        return [c for c in dict.fromkeys(c for _, c in list_dataset(data))]
    except ValueError:  # no or one class folder yet: a new data folder
        return sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))


def _target_class(where: str, item: Reviewed, classes: list[str], folders: list[str]) -> str:
    """The DATA folder for a reviewer's label: one named after that class (as the folder or as
    its display name), else a new folder named as the label."""
    known = classes or [display_name(f) for f in folders]
    if not known:
        raise ReviewImportError(f"{where} has no Run sheet listing the model's classes, and the data folder has no class folders")
    meta = BundleMeta(name="", arch="", classes=known)
    i = meta.class_index(item.reviewer_label)
    if i is None:
        raise ReviewImportError(
            f"{where}, row {item.row}: {item.reviewer_label!r} is not a class of the model; "
            f"the classes are: {', '.join(known)}"
        )
    label = known[i]
    for folder in folders:
        if BundleMeta(name="", arch="", classes=[folder]).class_index(label) is not None:
            return folder
    if label in (".", "..") or any(c in label for c in "/\\\0:") or len(label) > 120:
        # A new class folder is one plain name inside DATA: a Run sheet's class never leads out of it.
        raise ReviewImportError(f"{where}, row {item.row}: the class {label!r} cannot be a folder name inside "
                                "the data folder; nothing was imported")
    return label


# -- import --------------------------------------------------------------------------------------
def import_reviews(workbooks: list[Path], data: Path, images: Path | None = None) -> ImportSummary:
    """Copy every reviewed image of `workbooks` into DATA/<class>/ and add it to the manifest."""
    data = Path(data)
    books = [read_workbook(Path(w), images) for w in workbooks]
    manifest = read_manifest(data)
    known = {row["sha256"]: row for row in manifest}
    folders = _class_folders(data)
    summary = ImportSummary(workbooks=len(books))
    plan: list[tuple[Workbook, Reviewed, str, str]] = []  # (workbook, row, class folder, sha256)
    for book in books:
        summary.unreviewed += book.unreviewed
        for item in book.rows:
            folder = _target_class(book.path.name, item, book.classes, folders)
            sha = file_sha256(item.image)
            earlier = known.get(sha)
            if earlier is not None:
                if earlier["class"] != folder and "row" in earlier:  # two rows of this import, one image
                    raise ReviewImportError(
                        f"{book.path.name}, row {item.row}: {item.file} is the same image as {earlier['file']} "
                        f"({earlier['source']}, row {earlier['row']}), which is labelled {earlier['class']!r}"
                    )
                if earlier["class"] != folder:  # imported by an earlier run
                    raise ReviewImportError(
                        f"{book.path.name}, row {item.row}: {item.file} was imported before as {earlier['class']!r} "
                        f"(from {earlier['source']}); to relabel it, delete its row in {MANIFEST} and {earlier['path']}"
                    )
                summary.already[folder] += 1
                continue
            known[sha] = {"class": folder, "source": book.path.name, "file": item.file, "row": str(item.row)}
            plan.append((book, item, folder, sha))

    copied: list[Path] = []
    now = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        for book, item, folder, sha in plan:
            target, new = _copy_in(item.image, data / folder, sha, item.slide)
            if new:
                copied.append(target)
            manifest.append({
                "path": target.relative_to(data).as_posix(), "class": folder, "sha256": sha, "source": book.path.name,
                "source_sha256": book.sha256, "root": str(book.root), "file": item.file, "slide": item.slide,
                "model_label": item.model_label, "reviewer_label": item.reviewer_label,
                "reviewed_by": item.reviewed_by, "reviewed_at": item.reviewed_at, "model": book.model,
                "model_sha256": book.model_sha256, "imported_at": now,
            })
            summary.added[folder] += 1
            if item.model_label.casefold() != item.reviewer_label.casefold():
                summary.corrections[folder] += 1
        if plan:
            write_text_atomic(data / MANIFEST, manifest_text(manifest))
    except OSError as exc:
        for path in copied:
            path.unlink(missing_ok=True)
        raise ReviewImportError(f"cannot write into {data} ({exc.strerror or exc}); nothing was imported") from None
    return summary


def _name(sha: str, slide: str, image: Path) -> str:
    """A name no other image can take: the content hash first (so file-number neighbours of other
    series never join its group), then the slide and the original name to stay recognisable."""
    return f"r{sha[:16]}-{_safe(slide) or 'slide'}-{_safe(image.stem) or 'image'}{image.suffix.lower()}"


def _safe(text: str) -> str:
    """`text` as a short portable file-name part (letters, digits, . - _)."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._")[:60]


def _copy_in(image: Path, folder: Path, sha: str, slide: str) -> tuple[Path, bool]:
    """Copy `image` into `folder` under its hash name, through a hidden temporary file renamed into
    place (never a half-copied image a training run could read); (target, whether copied now).
    An identical file already there was left by an import that stopped before its manifest."""
    target = folder / _name(sha, slide, image)
    if target.is_file() and file_sha256(target) == sha:
        return target, False
    if target.exists():
        raise OSError(f"{target} exists with other content")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".import-", suffix=".part", dir=folder)
    os.close(fd)
    try:
        shutil.copyfile(image, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target, True
