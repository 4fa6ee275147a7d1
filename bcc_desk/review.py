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
from bcc_desk.images import discover_images
from bcc_desk.lab_records import (
    LabRecords,
    Signature,
    SlideIdentity,
    SlidesFileError,
    checked_identity,
    read_slides_csv,
    write_slides_csv,
)
from bcc_desk.prediction import Prediction, relative_location
from bcc_desk.report import REVIEW_COLUMNS
from bcc_desk.report_target import write_somewhere
from bcc_desk.run_record import RunInfo
from bcc_desk.slides import SlideCount, count_slides


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
    lab: LabRecords
    """The slides' identities, the reviewers' labels and the sign-offs, as they stood."""

    def write(self, out: Path) -> tuple[Path, str | None]:
        """The CLI's writer (xlsx, or CSV for a .csv path), with the reviewer's label, name and
        time as extra Images columns.  Returns the path written (a sibling when `out` is open in
        Excel) and, when `out`'s folder could not take it (no space, read-only, gone) and it went
        to a fallback folder, why.  Raises ReportError when no place could take it."""
        reviews = self.reviews

        def get(name: str):
            return lambda p: getattr(reviews[p.path], name) if p.path in reviews else None

        extra = dict(zip(REVIEW_COLUMNS, (get("label"), get("by"), get("at")), strict=True))
        return write_somewhere(self.predictions, Path(out), self.run_info, extra_columns=extra, lab=self.lab)


class ReviewSession:
    """The rows of the open folder and their reviews.  Signals, for observers such as a Qt table
    model (all emitted on the thread that changes the session):

    * `resetting` / `reset`: every row is about to go / has gone;
    * `inserting(first, last)` / `inserted(first, last)`: rows are about to be / were appended;
    * `changed(first, last)`: rows first..last have a new prediction or review;
    * `slide_changed(slide)`: a slide's identity or signature changed;
    * `signature_cleared(slide, message)`: a review changed a signed slide, whose signature is
      gone (the message says so, for the reviewer)."""

    resetting = Signal()
    reset = Signal()
    inserting = Signal(int, int)
    inserted = Signal(int, int)
    changed = Signal(int, int)
    slide_changed = Signal(str)
    signature_cleared = Signal(str, str)

    def __init__(self) -> None:
        self.root: Path | None = None
        self.classes: list[str] = []
        """The model's class names (display names): the labels a reviewer may give."""
        self.run_info: RunInfo | None = None
        """The Run sheet's record of the classifier that made the rows (set when a run starts)."""
        self.started: datetime | None = None
        self.finished: datetime | None = None
        self.not_classified: list[str] = []
        """The images of a stopped run that it never reached (as the file column spells them)."""
        self.identities: dict[str, SlideIdentity] = {}
        """The slides' identities: the folder's `slides.csv`, as edited in the app."""
        self._rows: list[Prediction] = []
        self._row_of: dict[Path, int] = {}
        self._reviews: dict[Path, Review] = {}
        self._signatures: dict[str, Signature] = {}
        self._generation = 0  # counts review changes, so an export knows whether it is the latest
        self._exported = 0

    # -- rows ---------------------------------------------------------------------------------
    def start(self, root: Path) -> str | None:
        """A new run over `root`: no rows; the reviews and signatures stay when it is the same
        folder again.  The slides' identities are read from its `slides.csv`; returns, when that
        file cannot be used, the one line that says why (the run goes on without identities)."""
        same = root == self.root
        self.resetting.emit()
        self.root = root
        self._rows, self._row_of = [], {}
        if not same:
            self._reviews, self._signatures = {}, {}
            self._exported = self._generation  # nothing left to export of the folder before
        self.run_info = None
        self.started, self.finished, self.not_classified = datetime.now(UTC), None, []
        try:
            self.identities = read_slides_csv(root if root.is_dir() else root.parent)
        except SlidesFileError as exc:
            self.identities = {}
            return str(exc)
        finally:
            self.reset.emit()
        return None

    def finish(self, completed: bool) -> None:
        """The run has ended; a run stopped before its end lists the images it never reached."""
        self.finished = datetime.now(UTC)
        if completed or self.root is None:
            self.not_classified = []
            return
        folder = self.root if self.root.is_dir() else self.root.parent
        self.not_classified = [relative_location(path, folder)[0] for path in discover_images(self.root)
                               if path not in self._row_of]

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
        """Flag the rows of `slides` as those slides now stand (`ReviewPolicy.apply`, with the
        thresholds of the run that made them): a new image can change what its slide agrees on."""
        info = self.run_info
        if info is None or not info.review_policy.consensus:
            return
        rows = [i for i, p in enumerate(self._rows) if p.slide in slides]
        now = info.review_policy.apply([self._rows[i] for i in rows])
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
        if self._signatures.pop(p.slide, None) is not None:
            self._generation += 1
            self.slide_changed.emit(p.slide)
            self.signature_cleared.emit(p.slide, f"The signature of slide {p.slide} was cleared: a review changed "
                                                 f"after it was signed. Sign it again once it is reviewed.")

    # -- slides -------------------------------------------------------------------------------
    def signature(self, slide: str) -> Signature | None:
        return self._signatures.get(slide)

    def sign(self, slide: str, by: str) -> Signature:
        """A reviewer signs `slide` now.  Raises ValueError for a slide with no rows or no name."""
        if not by.strip():
            raise ValueError("a signature needs the reviewer's name")
        if not any(p.slide == slide for p in self._rows):
            raise ValueError(f"no such slide in the table: {slide}")
        signature = Signature(by.strip(), datetime.now(UTC))
        self._signatures[slide] = signature
        self._generation += 1
        self.slide_changed.emit(slide)
        return signature

    def unsign(self, slide: str) -> None:
        if self._signatures.pop(slide, None) is not None:
            self._generation += 1
            self.slide_changed.emit(slide)

    def set_identity(self, slide: str, identity: SlideIdentity) -> Path | None:
        """Give `slide` its identity and write the folder's `slides.csv` (returns its path; None
        when there is no folder).  Raises SlidesFileError for a bad field, OSError when the file
        cannot be written (the identity is then not changed)."""
        identity = checked_identity(identity)
        identities = {**self.identities, slide: identity}
        path = None
        if self.root is not None:
            path = write_slides_csv(self.root if self.root.is_dir() else self.root.parent, identities)
        self.identities = identities
        self._generation += 1
        self.slide_changed.emit(slide)
        return path

    def lab_records(self) -> LabRecords:
        """The identities, reviewers' labels and signatures of the rows present, copied."""
        slides = {p.slide for p in self._rows}
        return LabRecords(identities={s: i for s, i in self.identities.items() if s in slides},
                          reviewed={path: r.label for path, r in self.reviews().items()},
                          signatures={s: sig for s, sig in self._signatures.items() if s in slides})

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
            not_classified=list(self.not_classified),
            extra={"front end": f"bcc-desk {__version__} desktop app", "reviewed images": str(len(reviews))},
        )
        return Export(self.predictions(), reviews, info, self._generation, self.lab_records())

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
