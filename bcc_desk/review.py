"""One folder under review: the model's predictions, a person's label for some of them, the
per-slide counts and the export.  No Qt: the desktop app's table and slide summary observe a
`ReviewSession` through its signals (psygnal, as napari's models), so everything a reviewer
relies on is tested without a display.

One row per image: a prediction for an image already present (a watched file written again)
replaces the row's prediction.  Reviews are kept by image path, so classifying the same folder
again keeps them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from psygnal import Signal

from bcc_desk import __version__
from bcc_desk.prediction import Prediction
from bcc_desk.report import REVIEW_COLUMNS, RunInfo, write_somewhere
from bcc_desk.slides import SlideCount, count_slides, with_slide_consensus


@dataclass(frozen=True, slots=True)
class Review:
    """A person's label for one image, and who gave it when."""

    label: str
    by: str
    at: datetime


@dataclass(frozen=True)
class Export:
    """What one export writes, copied when it was asked for: a report written on another
    thread is not changed by reviews made meanwhile."""

    predictions: list[Prediction]
    reviews: dict[Path, Review]
    run_info: RunInfo
    """The Run sheet's record of the classifier that made the rows, and how the run went."""
    generation: int

    def write(self, out: Path) -> tuple[Path, str | None]:
        """The CLI's writer (xlsx, or CSV for a .csv path), with the reviewer's label, name and
        time as extra Images columns.  Returns the path written (a sibling when `out` is open in
        Excel) and, when `out`'s folder could not take it (no space, read-only, gone) and it went
        to a fallback folder, why.  Raises ReportError when no place could take it."""
        reviews = self.reviews

        def get(name: str):
            return lambda p: getattr(reviews[p.path], name) if p.path in reviews else None

        extra = dict(zip(REVIEW_COLUMNS, (get("label"), get("by"), get("at")), strict=True))
        return write_somewhere(self.predictions, Path(out), self.run_info, extra_columns=extra)


class ReviewSession:
    """The rows of the open folder and their reviews.  Signals, for observers such as a Qt table
    model (all emitted on the thread that changes the session):

    * `resetting` / `reset`: every row is about to go / has gone;
    * `inserting(first, last)` / `inserted(first, last)`: rows are about to be / were appended;
    * `changed(first, last)`: rows first..last have a new prediction or review."""

    resetting = Signal()
    reset = Signal()
    inserting = Signal(int, int)
    inserted = Signal(int, int)
    changed = Signal(int, int)

    def __init__(self) -> None:
        self.root: Path | None = None
        self.classes: list[str] = []
        """The model's class names (display names): the labels a reviewer may give."""
        self.run_info: RunInfo | None = None
        """The Run sheet's record of the classifier that made the rows (set when a run starts)."""
        self.started: datetime | None = None
        self.finished: datetime | None = None
        self.outcome = ""
        """'complete', 'stopped after N of M images'; '' while running or watching."""
        self._rows: list[Prediction] = []
        self._row_of: dict[Path, int] = {}
        self._reviews: dict[Path, Review] = {}
        self._generation = 0  # counts review changes, so an export knows whether it is the latest
        self._exported = 0

    # -- rows ---------------------------------------------------------------------------------
    def start(self, root: Path) -> None:
        """A new run over `root`: no rows; the reviews stay when it is the same folder again."""
        same = root == self.root
        self.resetting.emit()
        self.root = root
        self._rows, self._row_of = [], {}
        if not same:
            self._reviews = {}
            self._exported = self._generation  # nothing left to export of the folder before
        self.run_info = None
        self.started, self.finished, self.outcome = datetime.now(UTC), None, ""
        self.reset.emit()

    def finish(self, outcome: str) -> None:
        self.finished, self.outcome = datetime.now(UTC), outcome

    def add(self, predictions: list[Prediction]) -> list[Prediction]:
        """Append a batch of rows (one signal pair per batch, not per row).  An image already
        present keeps its one row, which takes the new prediction; returns the replaced ones."""
        fresh: dict[Path, Prediction] = {}
        replaced: dict[int, Prediction] = {}
        for p in predictions:
            row = self._row_of.get(p.path)
            if row is None:
                fresh[p.path] = p
            else:
                replaced.setdefault(row, self._rows[row])
                self._rows[row] = p
        if replaced:
            self.changed.emit(min(replaced), max(replaced))
        if fresh:
            first = len(self._rows)
            self.inserting.emit(first, first + len(fresh) - 1)
            for i, p in enumerate(fresh.values(), start=first):
                self._rows.append(p)
                self._row_of[p.path] = i
            self.inserted.emit(first, first + len(fresh) - 1)
        self._review_slides({p.slide for p in predictions})
        return list(replaced.values())

    def _review_slides(self, slides: set[str]) -> None:
        """Flag the rows of `slides` as those slides now stand (`with_slide_consensus`, with the
        thresholds of the run that made them): a new image can change what its slide agrees on."""
        info = self.run_info
        if info is None or info.slide_review_threshold is None:  # the consensus is off
            return
        rows = [i for i, p in enumerate(self._rows) if p.slide in slides]
        now = with_slide_consensus([self._rows[i] for i in rows], info.review_threshold, info.slide_review_threshold)
        moved = [i for i, p in zip(rows, now, strict=True) if p is not self._rows[i]]
        for i, p in zip(rows, now, strict=True):
            self._rows[i] = p
        if moved:
            self.changed.emit(min(moved), max(moved))

    def __len__(self) -> int:
        return len(self._rows)

    def prediction(self, row: int) -> Prediction:
        return self._rows[row]

    def predictions(self) -> list[Prediction]:
        return list(self._rows)

    def row_of(self, path: Path) -> int | None:
        return self._row_of.get(Path(path))

    def find(self, target: int | str | Path) -> int:
        """The row of one image: a row number, the file as the table shows it (relative to the
        folder), or the image's path.  Raises KeyError."""
        if isinstance(target, int):
            row: int | None = target
        else:
            row = self.row_of(Path(target)) if Path(target).is_absolute() else None
            if row is None:
                row = next((i for i, p in enumerate(self._rows) if p.file == str(target)), None)
        if row is None or not 0 <= row < len(self._rows):
            raise KeyError(f"no such image in the table: {target}")
        return row

    # -- reviews ------------------------------------------------------------------------------
    def review(self, row: int) -> Review | None:
        return self._reviews.get(self._rows[row].path)

    def reviews(self) -> dict[Path, Review]:
        """Reviews of the rows present (reviews carried over from an earlier run included)."""
        return {p.path: self._reviews[p.path] for p in self._rows if p.path in self._reviews}

    def set_review(self, row: int, label: str | None, by: str) -> None:
        """Give a row a person's label, recorded with `by` and the time (None clears it).
        Raises ValueError for a label that is not one of the model's classes, or for an image
        that could not be read (a person cannot label what nobody can see)."""
        p = self._rows[row]
        if label is None:
            if self._reviews.pop(p.path, None) is None:
                return
        else:
            if label not in self.classes:
                raise ValueError(f"{label!r} is not one of the model's classes {self.classes}")
            if p.error is not None:
                raise ValueError(f"{p.file} is unreadable: a person cannot label it")
            self._reviews[p.path] = Review(label, by, datetime.now(UTC))
        self._generation += 1
        self.changed.emit(row, row)

    @property
    def unexported_reviews(self) -> bool:
        """A review was given or cleared since the last export written."""
        return self._generation != self._exported

    def slide_counts(self) -> dict[str, SlideCount]:
        """Per slide, in the report's order; a reviewed image counts under the reviewer's label."""
        return count_slides(self._rows, {path: r.label for path, r in self._reviews.items()})

    # -- export -------------------------------------------------------------------------------
    def snapshot(self) -> Export:
        """What an export writes now.  Raises ValueError when there is nothing to export."""
        if not self._rows:
            raise ValueError("nothing to export: no image has been classified yet")
        if self.run_info is None:
            raise ValueError("nothing to export: no run has started yet")
        reviews = self.reviews()
        info = replace(
            self.run_info, root=str(self.root or self.run_info.root),
            command=shlex.join(["bcc-desk", str(self.root or "")]),
            started=self.started or self.run_info.started, finished=self.finished,
            extra={"front end": f"bcc-desk {__version__} desktop app", "run": self.outcome or "watching",
                   "reviewed images": str(len(reviews))},
        )
        return Export(self.predictions(), reviews, info, self._generation)

    def exported(self, export: Export) -> None:
        """`export` has been written: its reviews no longer count as unexported."""
        self._exported = max(self._exported, export.generation)

    def export(self, out: Path) -> tuple[Path, str | None]:
        """Write the report now (see `Export.write`).  The reviews count as exported once a
        file holds them, wherever it had to go; a failure keeps them unexported."""
        export = self.snapshot()
        written = export.write(out)
        self.exported(export)
        return written
