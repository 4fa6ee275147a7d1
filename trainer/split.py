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

The listing of a data set is `trainer.dataset`; the groups, and how their defaults were chosen,
`trainer.grouping`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from bcc_desk.files import write_text_atomic
from bcc_desk.images import is_candidate
from trainer.dataset import list_dataset, sorted_classes
from trainer.grouping import NEIGHBOUR_WINDOW, PHASH_THRESHOLD, group_images, phash_images
from trainer.manifest import slide_keys  # images imported from a lab's reviews know their slide

SPLITS: tuple[str, str, str] = ("train", "val", "test")
COLUMNS: tuple[str, ...] = ("path", "class", "group", "split", "phash")

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
        return cls(rows=rows, classes=sorted_classes(r.cls for r in rows), seed=None)


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
        classes = sorted_classes([*self.classes, *(c for _, c in new)])
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
    classes = sorted_classes(c for _, c in items)
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
