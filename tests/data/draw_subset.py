"""Draw the test subset in tests/data/all4-mini from the full public data set (run once, by hand).

    python tests/data/draw_subset.py PATH/TO/all4 tests/data/all4-mini

The subset keeps what the tests rely on: every image that has a byte-identical twin or a
near-duplicate in the full set (perceptual hash within 12 bits, or 13-16 bits for neighbouring
numbers of one class), so the split's leak tests stay meaningful, then the lowest-numbered
other images of each class up to PER_CLASS.  Deterministic: the same data gives the same subset.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import imagehash
from PIL import Image

PER_CLASS = 75


def _number(path: Path) -> int:
    return int(re.search(r"(\d+)\.\w+$", path.name).group(1))


def draw(data: Path) -> list[Path]:
    files = sorted(data.glob("*/*.jpg"))
    digests: dict[str, list[Path]] = defaultdict(list)
    hashes = {}
    for f in files:
        digests[hashlib.sha256(f.read_bytes()).hexdigest()].append(f)
        with Image.open(f) as im:
            hashes[f] = imagehash.phash(im)
    keep = {f for twins in digests.values() if len(twins) > 1 for f in twins}
    for a_i, a in enumerate(files):
        for b in files[a_i + 1:]:
            bits = hashes[a] - hashes[b]
            neighbours = a.parent == b.parent and abs(_number(a) - _number(b)) <= 4
            if bits <= 12 or (neighbours and bits <= 16):
                keep |= {a, b}
    for folder in sorted({f.parent for f in files}):
        mine = sorted((f for f in files if f.parent == folder), key=_number)
        for f in mine:
            if sum(1 for k in keep if k.parent == folder) >= PER_CLASS:
                break
            keep.add(f)
    return sorted(keep)


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    for f in draw(data):
        dest = out / f.relative_to(data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)


if __name__ == "__main__":
    main()
