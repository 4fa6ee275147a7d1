"""A folder-per-class data set as the trainer sees it: its images and classes, and the
fingerprint of its exact content."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bcc_desk.files import file_sha256
from bcc_desk.images import discover_images


def list_dataset(data: Path) -> list[tuple[str, str]]:
    """(relative posix path, class) of every image under `data`, sorted by path.

    The class is the top-level folder, as in the Kaggle layout a user downloads.  Images lying
    directly in `data` are refused rather than silently left out: they have no label, and a user
    who pointed at one class folder instead of the data set should hear so, not train on nothing.
    Classes come in the order a file manager shows them (see `sorted_classes`).
    """
    data = Path(data)
    if not data.exists():
        raise ValueError(f"data folder not found: {data}")
    if not data.is_dir():
        raise ValueError(f"not a folder: {data} (give the folder that holds one sub-folder per class)")
    root = data.absolute()
    items: list[tuple[str, str]] = []
    loose: list[str] = []
    for path in discover_images(root):
        rel = path.relative_to(root)
        if len(rel.parts) == 1:
            loose.append(rel.name)
        else:
            items.append((rel.as_posix(), rel.parts[0]))
    if loose:
        raise ValueError(
            f"{len(loose)} image(s) lie directly in {data} (first: {loose[0]}); "
            "put every image in a sub-folder named after its class"
        )
    classes = sorted_classes({c for _, c in items})
    if len(classes) < 2:
        found = f": {', '.join(classes)}" if classes else ""
        raise ValueError(f"{data} needs at least 2 class folders with images, found {len(classes)}{found}")
    items.sort()
    return items


def sorted_classes(names: Iterable[str]) -> list[str]:
    """The order a file manager shows: letters and digits only, case-insensitive (ties by code point).

    For the Kaggle folders that is Benign, [Malignant] early Pre-B, [Malignant] Pre-B,
    [Malignant] Pro-B, the order the project's models use for their outputs; plain code-point
    order would put "[" after "B" and "early" after "Pro", and locale collation differs by machine.
    """

    def key(name: str) -> tuple[str, str, str]:
        folded = name.casefold()
        return ("".join(ch for ch in folded if ch.isalnum()), folded, name)

    return sorted(set(names), key=key)


def data_fingerprint(data: Path, workers: int | None = None) -> str:
    """sha256 over the sorted (relative path, file sha256) of every image under `data`.

    Identifies the exact data a model was trained on: any added, removed, renamed, moved or
    edited image changes it.  It is the sha256 of the text `sha256sum` prints for the images
    ("<hex>  <path>\\n" per image, sorted by path), so it can be checked without this code.
    """
    root = Path(data).absolute()
    paths = [p for p, _ in list_dataset(data)]

    def file_sha(rel: str) -> str:
        try:
            return file_sha256(root / rel)
        except OSError as exc:
            raise ValueError(f"cannot read image {rel}: {exc.strerror or exc}") from None

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        shas = list(pool.map(file_sha, paths))
    total = hashlib.sha256()
    for rel, sha in zip(paths, shas, strict=True):
        total.update(f"{sha}  {rel}\n".encode())
    return total.hexdigest()
