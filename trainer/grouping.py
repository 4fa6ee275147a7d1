"""The groups a split must keep together: shots of one microscope field (`trainer.split`).

* **perceptual-hash near-duplicates** — every pair of images in the whole data set (also across
  classes: a field filed under two labels would leak just the same) whose 64-bit `phash` differs in
  at most `PHASH_THRESHOLD` bits;
* **neighbouring file numbers** — within one folder and file-name series, images whose trailing
  numbers fall in the same block of `NEIGHBOUR_WINDOW` consecutive numbers (a block, not a sliding
  window: "differs by at most w", applied transitively, would chain a whole folder into one group).

How the defaults were chosen, on `all4` (2,722 images; 64-bit phash; the distances come out even):

* nearest-neighbour distance of every image: 0: 85, 2: 43, 4: 6, 6: 10, 8: 4, 10: 14, 12: 33,
  14: 282, 16: 1023, 18: 1115, 20: 106, 22: 1 — a sparse tail of near-duplicates below the bulk;
* consecutive file numbers in one class: distances 0-14 (64 pairs; those looked at are the same
  field, shifted or refocused), none at 16, then 18 and up (2,642 pairs: different fields);
* pairs at <= 12 bits: 101, of which 92 in one class (those looked at: mostly the same field; gaps
  1-4 mostly, also 11, 12 and up to 542 apart) and 9 across classes (different fields,
  harmless to merge); at <= 14 bits 274 pairs, 128 across classes: the hash no longer tells
  fields apart, and with the number blocks they chain into one group of 1,410 images.
  So 12 bits; the two same-field pairs at 14 (numbers 880/881, 772/773) share a number block.
* the same-class pairs at <= 12 bits are 4 numbers apart or less but for 8 (62 at gap 1, 14 at 2,
  6 at 3, 2 at 4), so blocks of 10 keep most runs of shots together even where the hash misses
  one (the hash catches the far-apart pairs wherever they lie): every same-class
  pair within 4 numbers and 16 bits ends up in one group.  With 12 bits and blocks of 10 the data
  set has 259 groups (214 of 10 images, the largest 40); blocks of 5 would give 512 (largest 20).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import imagehash
import numpy as np

from bcc_desk.images import ImageReadError, open_image

PHASH_THRESHOLD: int = 12
"""Largest Hamming distance (of 64 bits) at which two images count as shots of one field."""

NEIGHBOUR_WINDOW: int = 10
"""Images whose trailing file numbers share a block of this many consecutive numbers are grouped."""

_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")


_PHASH_MEMO: dict[tuple[str, int, int], str] = {}
_PHASH_LOCK = threading.Lock()


def phash_images(data: Path, rel_paths: Sequence[str], workers: int | None = None) -> list[str]:
    """64-bit `imagehash.phash` (16 hex digits) of each image, in the order given.

    Decoding dominates, so it runs in a thread pool (Pillow releases the GIL) through the
    application's safe reader; a large camera JPEG is decoded at a reduced scale (the hash only
    looks at 32x32 pixels; images of 256 px and less are decoded in full, so their hash equals
    plain `imagehash.phash(Image.open(f))`).  Results are remembered per process by
    (file, size, mtime), so a second split of the same data does not decode again.
    An unreadable image is a one-line `ValueError` naming it.
    """
    root = Path(data).absolute()

    def one(rel: str) -> str:
        path = root / rel
        try:
            st = path.stat()
        except OSError as exc:
            raise ValueError(f"cannot read image {rel}: {exc.strerror or exc}") from None
        key = (str(path), st.st_size, st.st_mtime_ns)
        with _PHASH_LOCK:
            known = _PHASH_MEMO.get(key)
        if known is not None:
            return known
        try:
            image = open_image(path, reduce_to=64)
        except ImageReadError as exc:
            raise ValueError(f"cannot read image {rel}: {exc}") from None
        value = str(imagehash.phash(image))
        with _PHASH_LOCK:
            _PHASH_MEMO[key] = value
        return value

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, rel_paths))


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def near_duplicate_pairs(hashes: Sequence[str], threshold: int = PHASH_THRESHOLD) -> list[tuple[int, int]]:
    """Index pairs (i < j, sorted) whose hashes differ in at most `threshold` bits.

    All pairs, by XOR and popcount on uint64 in blocks of rows: 2,722 images are 3.7 million
    pairs, a fraction of a second, and no pair is missed the way a bucketing index could miss one.
    """
    h = np.array([int(x, 16) for x in hashes], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    block = 512
    for start in range(0, len(h), block):
        rows = h[start : start + block]
        dist = _popcount64(rows[:, None] ^ h[None, :])
        i, j = np.nonzero(dist <= threshold)
        i = i + start
        keep = j > i
        pairs.extend(zip(i[keep].tolist(), j[keep].tolist()))
    pairs.sort()
    return pairs


def group_images(
    rel_paths: Sequence[str],
    hashes: Sequence[str],
    threshold: int = PHASH_THRESHOLD,
    neighbour_window: int = NEIGHBOUR_WINDOW,
    slides: Sequence[str | None] | None = None,
) -> list[int]:
    """Group id per image: union-find over near-duplicate hashes, blocks of file numbers and,
    where `slides` gives one (an image imported from a lab's review), the slide it came from.

    Group ids are numbered 0, 1, ... in the order of each group's first image in `rel_paths`,
    so they depend only on the data, never on set or dict iteration order.
    A `neighbour_window` of 1 turns the number rule off (every block holds one number).
    """
    if neighbour_window < 1:
        raise ValueError(f"neighbour_window must be at least 1, not {neighbour_window}")
    n = len(rel_paths)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for i, j in near_duplicate_pairs(hashes, threshold):
        union(i, j)

    first_in_block: dict[tuple[str, str, int], int] = {}
    for i, rel in enumerate(rel_paths):
        key = number_block(rel, neighbour_window)
        if key is None:
            continue
        if key in first_in_block:
            union(first_in_block[key], i)
        else:
            first_in_block[key] = i

    # One slide is one patient: every image of it stays on one side of the split.
    first_of_slide: dict[str, int] = {}
    for i, slide in enumerate(slides or ()):
        if slide is not None:
            union(first_of_slide.setdefault(slide, i), i)

    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(n)]


def number_block(rel_path: str, neighbour_window: int = NEIGHBOUR_WINDOW) -> tuple[str, str, int] | None:
    """(folder, name prefix, block) of a file whose name ends in a number: the images of one
    block are one group.  A series is one folder and one name prefix ("A-001" and "B-001" are
    different fields); None for a name without a trailing number."""
    p = PurePosixPath(rel_path)
    match = _TRAILING_NUMBER.match(p.stem)
    if match is None:
        return None
    return str(p.parent), match.group(1), int(match.group(2)) // neighbour_window
