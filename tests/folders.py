"""Large folders of real images for the GUI tests and benchmarks (not a test module)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path


def spread_images(dest: Path, images: Sequence[Path], n: int, slide: Callable[[int], str]) -> Path:
    """n real images (repeated when n exceeds `images`), image k in folder `slide(k)`; hard
    links where the file system allows, copies elsewhere."""
    for k in range(n):
        src = images[k % len(images)]
        target = dest / slide(k) / f"{k:05d}-{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(src)
        except OSError:
            shutil.copy(src, target)
    return dest


def class_subset(dest: Path, source: Path, classes: Sequence[str], pick: slice) -> Path:
    """A data folder laid out like the public data set: for each class folder of `source`, the
    real images `pick` selects from its sorted listing, copied."""
    for c in classes:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / c).glob("*.jpg"))[pick]:
            shutil.copy(f, dest / c / f.name)
    return dest


def slide_folders(root: Path, images: dict[str, list[Path]], per_class: int, slides: Sequence[str],
                  *, empty_file: bool = True) -> Path:
    """`per_class` real images of each class copied round-robin into the `slides` folders, and
    (`empty_file`) an empty, unreadable file in the second slide."""
    for i, files in enumerate(images.values()):
        for j, f in enumerate(files[:per_class]):
            slide = root / slides[(i + j) % len(slides)]
            slide.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, slide / f.name)
    if empty_file:
        (root / slides[1] / "empty.jpg").write_bytes(b"")
    return root
