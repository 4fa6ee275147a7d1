"""An honest train/val/test split of a folder-per-class data set.

The public B-ALL images contain repeat shots of one microscope field: neighbouring file numbers,
some byte-identical, a few far apart in the numbering.  A random image-level split puts one shot
in train and its twin in test, and the test accuracy then measures memory, not skill.  So images
are first joined into *groups* that must stay together, and whole groups are dealt to the splits:

* **perceptual-hash near-duplicates** — every pair of images in the whole data set (also across
  classes: a field filed under two labels would leak just the same) whose 64-bit `phash` differs in
  at most `PHASH_THRESHOLD` bits;
* **neighbouring file numbers** — within one folder and file-name series, images whose trailing
  numbers fall in the same block of `NEIGHBOUR_WINDOW` consecutive numbers (a block, not a sliding
  window: "differs by at most w", applied transitively, would chain a whole folder into one group).

Groups are then dealt to train/val/test so that every class gets its share (stratified).  The file
names carry no patient id, so this is the honest stand-in for a patient-wise split, not one.
Images a lab imported from its own reviews (`trainer/reviews.py`) do carry their slide, and the
images of one slide (one patient) are one group: for those the split is patient-wise.

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

import csv
import hashlib
import io
import os
import random
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import imagehash
import numpy as np

from bcc_desk.files import file_sha256, write_text_atomic
from bcc_desk.images import ImageReadError, discover_images, is_candidate, open_image
from trainer.manifest import slide_keys  # images imported from a lab's reviews know their slide

__all__ = [
    "COLUMNS",
    "NEIGHBOUR_WINDOW",
    "PHASH_THRESHOLD",
    "SPLITS",
    "Split",
    "SplitRow",
    "data_fingerprint",
    "group_images",
    "list_dataset",
    "make_split",
    "near_duplicate_pairs",
    "number_block",
    "phash_images",
]

SPLITS: tuple[str, str, str] = ("train", "val", "test")
COLUMNS: tuple[str, ...] = ("path", "class", "group", "split", "phash")

PHASH_THRESHOLD: int = 12
"""Largest Hamming distance (of 64 bits) at which two images count as shots of one field."""

NEIGHBOUR_WINDOW: int = 10
"""Images whose trailing file numbers share a block of this many consecutive numbers are grouped."""

_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")


# -- listing ---------------------------------------------------------------------------------------
def list_dataset(data: Path) -> list[tuple[str, str]]:
    """(relative posix path, class) of every image under `data`, sorted by path.

    The class is the top-level folder, as in the Kaggle layout a user downloads.  Images lying
    directly in `data` are refused rather than silently left out: they have no label, and a user
    who pointed at one class folder instead of the data set should hear so, not train on nothing.
    Classes come in the order a file manager shows them (see `_sorted_classes`).
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
    classes = _sorted_classes({c for _, c in items})
    if len(classes) < 2:
        found = f": {', '.join(classes)}" if classes else ""
        raise ValueError(f"{data} needs at least 2 class folders with images, found {len(classes)}{found}")
    items.sort()
    return items


def _sorted_classes(names: Iterable[str]) -> list[str]:
    """The order a file manager shows: letters and digits only, case-insensitive (ties by code point).

    For the Kaggle folders that is Benign, [Malignant] early Pre-B, [Malignant] Pre-B,
    [Malignant] Pro-B, the order the project's models use for their outputs; plain code-point
    order would put "[" after "B" and "early" after "Pro", and locale collation differs by machine.
    """

    def key(name: str) -> tuple[str, str, str]:
        folded = name.casefold()
        return ("".join(ch for ch in folded if ch.isalnum()), folded, name)

    return sorted(set(names), key=key)


# -- perceptual hashes ------------------------------------------------------------------------------
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


# -- grouping ---------------------------------------------------------------------------------------
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


# -- the split --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitRow:
    """One image of a split: its path relative to DATA (posix), class, group, part and phash."""

    path: str
    cls: str
    group: int
    split: str
    phash: str


@dataclass
class Split:
    """Which part (train/val/test) every image of a data set belongs to.

    `seed` is the seed `make_split` used; it is not stored in split.csv, so a loaded split has
    `seed=None` (the csv itself, and its `sha256()`, is the record of what was used).
    """

    rows: list[SplitRow]
    classes: list[str]
    seed: int | None

    def _part(self, split: str) -> list[SplitRow]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        return [r for r in self.rows if r.split == split]

    def paths(self, split: str) -> list[str]:
        """Relative posix paths of one part, sorted; join them with DATA to read the images."""
        return [r.path for r in self._part(split)]

    def labels(self, split: str) -> list[int]:
        """Class index (into `classes`) of each path of `paths(split)`, in the same order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[r.cls] for r in self._part(split)]

    def groups(self, split: str) -> list[int]:
        """Near-duplicate group of each path of `paths(split)`, in the same order."""
        return [r.group for r in self._part(split)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per part and class, zeros included, for logs and the bundle's provenance."""
        out = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for r in self.rows:
            out[r.split][r.cls] += 1
        return out

    def sha256(self) -> str:
        """Hash of the sorted (path, part) pairs: identifies the split in a model's provenance.

        Computed over the UTF-8 lines "path<TAB>split\\n" sorted by path, so it depends only on
        which image went where (not on group numbering, hashes or the csv's formatting).
        """
        digest = hashlib.sha256()
        for path, part in sorted((r.path, r.split) for r in self.rows):
            digest.update(f"{path}\t{part}\n".encode())
        return digest.hexdigest()

    def to_csv(self) -> str:
        """The split.csv text: a header and one row per image, sorted by path."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in sorted(self.rows, key=lambda r: r.path):
            writer.writerow((r.path, r.cls, r.group, r.split, r.phash))
        return buf.getvalue()

    def save(self, path: Path) -> Path:
        """Write split.csv to `path` (a folder means `path/split.csv`); returns the file written.

        Written to a temporary file beside it and renamed into place, so an interrupted run never
        leaves a half-written split that a re-run would then trust.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "split.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, self.to_csv())

    @classmethod
    def load(cls, path: Path, data: Path) -> Split:
        """Re-read a saved split.csv and check that every image it lists is still under `data`.

        A re-run (or an evaluation) then uses exactly the same parts.  Any problem is a one-line
        `ValueError`: a missing image names the first one and how many are missing, because a
        split silently shrunk by vanished files would no longer be the one a model was judged on.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "split.csv"
        data = Path(data)
        if not path.is_file():
            raise ValueError(f"split file not found: {path}")
        if not data.is_dir():
            raise ValueError(f"data folder not found: {data}")
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                records = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"cannot read split file {path}: {exc}") from None
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(
                f"{path} is not a split file: expected the columns {','.join(COLUMNS)}, "
                f"found {','.join(header or []) or 'nothing'}"
            )
        rows: list[SplitRow] = []
        seen: set[str] = set()
        for line, rec in enumerate(records, start=2):
            if not rec:
                continue
            problem = _row_problem(rec, seen)
            if problem:
                raise ValueError(f"{path}, line {line}: {problem}")
            rows.append(SplitRow(rec[0], rec[1], int(rec[2]), rec[3], rec[4]))
            seen.add(rec[0])
        if not rows:
            raise ValueError(f"{path} lists no images")
        missing = [r.path for r in rows if not (data / r.path).is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(rows)} images in {path} are missing under {data} "
                f"(first: {missing[0]}); restore them, or make a new split"
            )
        rows.sort(key=lambda r: r.path)
        return cls(rows=rows, classes=_sorted_classes(r.cls for r in rows), seed=None)


    def extend(self, data: Path, seed: int = 0, workers: int | None = None) -> int:
        """Add the images of `data` this split does not list yet (e.g. imported from reviews),
        keeping every listed image in its part; returns how many were added.

        The new images are grouped with the whole data set as `make_split` groups: one that
        joins a group holding listed images goes to their part (a near-duplicate of a test
        image stays in test), the other groups (a lab's reviewed slides) are dealt among
        themselves as `make_split` deals any images, towards the parts' shares: so reviews reach
        validation and test too, where they judge the model on the lab's own slides (#37; dealt
        against what the parts already held, a few slides all went to training)."""
        listed = {r.path: r for r in self.rows}
        items = list_dataset(data)
        new = [(p, c) for p, c in items if p not in listed]
        if not new:
            return 0
        paths = [r.path for r in self.rows] + [p for p, _ in new]
        hashes = [r.phash for r in self.rows] + phash_images(data, [p for p, _ in new], workers)
        groups = group_images(paths, hashes, slides=slide_keys(data, paths))
        classes = _sorted_classes([*self.classes, *(c for _, c in new)])
        old = len(self.rows)
        part_of_group = {groups[i]: SPLITS.index(r.split) for i, r in enumerate(self.rows)}
        fresh = sorted({groups[i] for i in range(old, len(paths))} - set(part_of_group))
        index = {g: k for k, g in enumerate(fresh)}
        labels = [classes.index(c) for _, c in new]
        members = [i for i in range(len(new)) if groups[old + i] in index]
        dealt = _assign_groups(
            [labels[i] for i in members], [index[groups[old + i]] for i in members], len(classes),
            _fractions(self), seed,
        ) if members else []
        dealt = _every_part([sum(1 for i in members if groups[old + i] == g) for g in fresh], dealt)
        for k, g in enumerate(fresh):
            part_of_group[g] = dealt[k]
        self.rows += [
            SplitRow(p, c, groups[old + i], SPLITS[part_of_group[groups[old + i]]], hashes[old + i])
            for i, (p, c) in enumerate(new)
        ]
        self.rows.sort(key=lambda r: r.path)
        self.classes = classes
        return len(new)


def _every_part(sizes: list[int], parts: list[int]) -> list[int]:
    """`parts` (part index per group) with every part given a group where there are enough: a
    part left without one takes the smallest group of the part holding most groups.  A lab's few
    reviewed slides would otherwise all fall where the per-class targets pull them (training)."""
    parts = list(parts)
    for empty in range(len(SPLITS)):
        if len(parts) < len(SPLITS) or empty in parts:
            continue
        donor = max(range(len(SPLITS)), key=lambda p: (parts.count(p), -p))
        if parts.count(donor) < 2:
            continue
        smallest = min((g for g, p in enumerate(parts) if p == donor), key=lambda g: (sizes[g], g))
        parts[smallest] = empty
    return parts


def _fractions(split: Split) -> tuple[float, float, float]:
    """The parts' shares of a split as it stands (70/15/15 when made by `make_split`)."""
    counts = [sum(1 for r in split.rows if r.split == part) for part in SPLITS]
    total = max(1, sum(counts))
    return tuple(c / total for c in counts)  # type: ignore[return-value]


def _row_problem(rec: list[str], seen: set[str]) -> str | None:
    if len(rec) != len(COLUMNS):
        return f"expected {len(COLUMNS)} fields, found {len(rec)}"
    path, cls, group, part, phash = rec
    parts = PurePosixPath(path).parts
    if len(parts) < 2 or ".." in parts or path.startswith("/") or not is_candidate(PurePosixPath(path)):
        return f"not an image path inside a class folder: {path!r}"
    if parts[0] != cls:
        return f"class {cls!r} is not the top folder of {path!r}"
    if path in seen:
        return f"{path!r} is listed twice"
    if not re.fullmatch(r"[0-9]+", group):
        return f"group must be a whole number, not {group!r}"
    if part not in SPLITS:
        return f"split must be one of {', '.join(SPLITS)}, not {part!r}"
    if not re.fullmatch(r"[0-9a-f]{16}", phash):
        return f"phash must be 16 hex digits, not {phash!r}"
    return None


def make_split(
    data: Path,
    seed: int = 0,
    val: float = 0.15,
    test: float = 0.15,
    *,
    threshold: int = PHASH_THRESHOLD,
    neighbour_window: int = NEIGHBOUR_WINDOW,
    workers: int | None = None,
) -> Split:
    """A grouped, stratified train/val/test split of the images under `data`.

    Near-duplicates (see the module docstring) share a group, so do the images of one slide
    imported from a lab's reviews (`DATA/reviews.csv`), and groups never straddle parts.
    Groups are dealt largest first (ties in a seeded random order) to the part whose per-class
    counts most fall short of their targets: scikit-learn's `StratifiedGroupKFold` can only make
    parts of 1/k of the data, this reaches any `val`/`test` fraction, on all4 within a point per
    class.  The result depends only on the data and the seed: the same data and seed give the
    same split.csv, byte for byte, on any machine.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val and test must be fractions with val + test < 1, not val={val}, test={test}")
    items = list_dataset(data)
    paths = [p for p, _ in items]
    hashes = phash_images(data, paths, workers)
    groups = group_images(paths, hashes, threshold, neighbour_window, slide_keys(data, paths))
    classes = _sorted_classes(c for _, c in items)
    labels = [classes.index(c) for _, c in items]
    parts = _assign_groups(labels, groups, len(classes), (1 - val - test, val, test), seed)
    rows = [
        SplitRow(path, c, g, SPLITS[parts[g]], h)
        for (path, c), g, h in zip(items, groups, hashes, strict=True)
    ]
    return Split(rows=rows, classes=classes, seed=seed)


def _assign_groups(
    labels: list[int], groups: list[int], n_classes: int, fractions: tuple[float, float, float], seed: int,
) -> list[int]:
    """Part index per group id: greedy, largest group first, to the part it helps most.

    The score of putting a group in a part is the squared error of every part's per-class count
    against its target, relative to the class size (so a small class counts as much as a large
    one); the part with the lowest score after the move wins, ties to the earlier part.
    """
    n_groups = max(groups) + 1
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(groups), np.asarray(labels)), 1)
    totals = counts.sum(0).astype(float)
    target = np.outer(np.asarray(fractions, dtype=float), totals)  # (part, class)
    scale = np.maximum(totals, 1.0)

    order = list(range(n_groups))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -int(counts[g].sum()))  # stable: equal sizes keep the seeded order

    current = np.zeros((len(fractions), n_classes))
    assigned = [0] * n_groups
    for g in order:
        best, best_score = 0, float("inf")
        for s in range(len(fractions)):
            current[s] += counts[g]
            score = float((((current - target) / scale) ** 2).sum())
            current[s] -= counts[g]
            if score < best_score:
                best, best_score = s, score
        current[best] += counts[g]
        assigned[g] = best
    return assigned


# -- the data set's identity ------------------------------------------------------------------------
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
