"""The folder-watching daemon's memory: one SQLite row per file ever seen under ROOT.

The ledger, not the report and not the daemon's memory, is the source of truth.  The report is
always regenerated from it, so the two promises of `bcc watch` come from two properties here:

* **Exactly once.**  The primary key is the file's path relative to ROOT, so a file can never
  have two rows; the report lists the rows in state `done` or `error`, one per present file.
* **Crash safety.**  An outcome is committed in one transaction *after* the image was
  classified.  A crash before the commit leaves the row `pending` (or absent) and the file is
  classified on the next start; a crash after it leaves a `done` row whose size and mtime match
  the file, so it is not classified again.  WAL mode with synchronous=NORMAL survives a killed
  process whole; a power cut may roll back the last few commits, which only means those images
  are classified once more (still one row each).

States:
  pending   seen, not yet complete or not yet classified (or between read retries)
  done      classified; the prediction is in the row
  error     could not be read after the retries; `error` says why
  vanished  no longer under ROOT; the last outcome is kept, so the same file coming back (a
            share remounted, a slide folder moved away and back) is restored without work
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bcc_desk.prediction import Prediction, relative_location

SCHEMA_VERSION = 1
PENDING, DONE, ERROR, VANISHED = "pending", "done", "error", "vanished"
REPORTED = (DONE, ERROR)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path          TEXT PRIMARY KEY,   -- relative to ROOT, forward slashes
    size          INTEGER NOT NULL,
    mtime_ns      INTEGER NOT NULL,
    sha256        TEXT,               -- of the content the outcome is for
    state         TEXT NOT NULL CHECK (state IN ('{PENDING}', '{DONE}', '{ERROR}', '{VANISHED}')),
    attempts      INTEGER NOT NULL DEFAULT 0,  -- failed reads of the current content
    label         TEXT,
    confidence    REAL,
    margin        REAL,
    probabilities TEXT,               -- JSON object, in the model's class order
    needs_review  INTEGER,
    review_reason TEXT,
    error         TEXT,
    model         TEXT,
    model_sha256  TEXT,
    classified_at TEXT,
    ood_score     REAL,
    colour_score  REAL,
    first_seen    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
"""

_OUTCOME = (
    "label", "confidence", "margin", "probabilities", "needs_review", "review_reason", "error",
    "model", "model_sha256", "classified_at", "ood_score", "colour_score",
)


class LedgerError(Exception):
    """The state file cannot be used (another ROOT's, newer schema, not a database)."""


_STORAGE_FAULTS = {  # SQLite's primary result codes that say the storage, not the data, failed
    "SQLITE_FULL": "no space left on its disk",
    "SQLITE_READONLY": "its disk or file is read-only",
    "SQLITE_IOERR": "a disk I/O error",
    "SQLITE_CANTOPEN": "its folder cannot be written",
}


class _Damaged(sqlite3.DatabaseError):
    """`PRAGMA quick_check` found problems."""


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    """True when the file's pages are damaged (not when it is no database at all: that is
    refused, as --state may name someone else's file)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return isinstance(exc, _Damaged) or name.startswith("SQLITE_CORRUPT") or (not name and "malformed" in str(exc))


def storage_fault(exc: BaseException) -> str | None:
    """Why the ledger cannot be written, in words, when `exc` is the storage's fault (a full or
    read-only disk, an I/O error: it may pass); None for anything else."""
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    for code, reason in _STORAGE_FAULTS.items():
        if name == code or name.startswith(code + "_"):
            return reason
    text = str(exc).lower()  # an SQLite too old to name its errors
    for needle, code in (("disk is full", "SQLITE_FULL"), ("readonly", "SQLITE_READONLY"),
                         ("disk i/o", "SQLITE_IOERR"), ("unable to open", "SQLITE_CANTOPEN")):
        if needle in text:
            return _STORAGE_FAULTS[code]
    return None


@dataclass(frozen=True, slots=True)
class Row:
    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    state: str
    attempts: int
    label: str | None
    error: str | None
    model_sha256: str | None

    @property
    def outcome(self) -> str | None:
        """The state the row's stored outcome stands for (what a vanished row comes back as)."""
        return DONE if self.label is not None else ERROR if self.error is not None else None

    def matches(self, st: os.stat_result) -> bool:
        return self.size == st.st_size and self.mtime_ns == st.st_mtime_ns


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Ledger:
    """One connection to the ledger of one ROOT, used by one thread at a time: the report
    writer opens its own (WAL lets it read while the daemon writes)."""

    def __init__(self, path: Path, root: Path | None = None) -> None:
        """Open (creating it if need be) the ledger of `root`; without `root`, open an existing
        ledger to read it (the report writer, tests, a technician's script).

        Opened for `root` (the daemon), a ledger whose pages are damaged (a disk fault, a copy
        taken mid-write) is moved aside and a new one started: every image under ROOT is then
        classified again, and `damaged` says what happened, for the log."""
        self.path = Path(path)
        self.damaged: str | None = None
        """Set when a damaged ledger was moved aside for a new one: one line naming both."""
        create = root is not None
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                self._open(root)
            except sqlite3.DatabaseError as exc:
                if not (create and _corrupt(exc)):
                    raise
                aside = self._move_aside()
                self.damaged = (f"the ledger {self.path} was damaged ({exc}); it is kept as {aside.name} and a new one "
                                f"started: the results it held cannot be read, so every image under {root} is classified again")
                self._open(root)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot use the state file {self.path}: {exc}") from None
        self._db.row_factory = sqlite3.Row

    def _open(self, root: Path | None) -> None:
        create = root is not None
        uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        # Autocommit mode: every write below is its own short transaction (or an explicit one).
        # Not shared between threads at once, but built in one thread and used in another.
        self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30, check_same_thread=False)
        try:
            if create:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                # Damage found now, not at the first write a week later (a traceback on every start).
                problems = [r[0] for r in self._db.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise _Damaged("; ".join(problems))
                self._db.executescript(_SCHEMA)
            self.root = self._check_meta(root)
            self._add_missing_columns()
        except BaseException:
            self._db.close()  # a refused file is let go at once (it may be moved aside next)
            raise

    def _move_aside(self) -> Path:
        """Rename the damaged file (and its WAL and shared-memory files) out of the way, kept for
        whoever wants to look into it; returns the new name."""
        self._db.close()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            part = self.path.with_name(self.path.name + suffix)
            if part.exists():
                os.replace(part, aside.with_name(aside.name + suffix))
        return aside

    def _check_meta(self, root: Path | None) -> Path:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        version = int(meta.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise LedgerError(f"the state file {self.path} was written by a newer bcc-desk (schema {version})")
        recorded = meta.get("root")
        if root is None:
            if recorded is None:
                raise LedgerError(f"the state file {self.path} is not a bcc watch ledger")
            return Path(recorded)
        if recorded is not None and recorded != str(root):
            raise LedgerError(
                f"the state file {self.path} belongs to the folder {recorded}, not {root}; "
                "pass another --state"
            )
        if recorded is None:
            with self.transaction() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [("root", str(root)), ("schema_version", str(SCHEMA_VERSION))],
                )
        return Path(root)

    def _add_missing_columns(self) -> None:
        """A ledger from before the colour check gains its column (its rows keep None there)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(files)")}
        if "colour_score" not in columns:
            self._db.execute("ALTER TABLE files ADD COLUMN colour_score REAL")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- reading --------------------------------------------------------------------------------
    def get(self, path: str) -> Row | None:
        r = self._db.execute(f"SELECT {_ROW_FIELDS} FROM files WHERE path = ?", (_key(path),)).fetchone()
        return Row(_rel(r[0]), *r[1:]) if r is not None else None

    def rows(self) -> dict[str, Row]:
        return {_rel(r[0]): Row(_rel(r[0]), *r[1:]) for r in self._db.execute(f"SELECT {_ROW_FIELDS} FROM files")}

    def done_with_hash(self, sha256: str, model_sha256: str) -> str | None:
        """A path whose content `sha256` this model already classified (a copy or a move)."""
        r = self._db.execute(
            "SELECT path FROM files WHERE sha256 = ? AND model_sha256 = ? AND label IS NOT NULL LIMIT 1",
            (sha256, model_sha256),
        ).fetchone()
        return _rel(r[0]) if r is not None else None

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())

    def predictions(self) -> list[Prediction]:
        """The report's rows: every present file with an outcome, as the classifier made it."""
        cur = self._db.execute(
            f"SELECT path, {', '.join(_OUTCOME)} FROM files WHERE state IN (?, ?)", REPORTED
        )
        return [self._prediction(r) for r in cur]

    def prediction(self, path: str) -> Prediction | None:
        """The report's row of one file, or None when it has no outcome (pending, vanished)."""
        r = self._db.execute(
            f"SELECT path, {', '.join(_OUTCOME)} FROM files WHERE path = ? AND state IN (?, ?)", (_key(path), *REPORTED)
        ).fetchone()
        return self._prediction(r) if r is not None else None

    def _prediction(self, r: sqlite3.Row) -> Prediction:
        path = self.root / _rel(r["path"])
        file, slide = relative_location(path, self.root)
        return Prediction(
            path=path,
            file=file,
            slide=slide,
            label=r["label"],
            confidence=r["confidence"],
            margin=r["margin"],
            probabilities=json.loads(r["probabilities"] or "{}"),
            needs_review=bool(r["needs_review"]),
            review_reason=r["review_reason"] or "",
            error=r["error"],
            model=r["model"] or "",
            model_sha256=r["model_sha256"] or "",
            classified_at=datetime.fromisoformat(r["classified_at"]),
            ood_score=r["ood_score"],
            colour_score=r["colour_score"],
        )

    # -- writing --------------------------------------------------------------------------------
    def seen(self, path: str, st: os.stat_result) -> None:
        """Note a file the first time it shows up (an existing row keeps its outcome until a
        new one is recorded, so the report never loses the file meanwhile)."""
        now = _now()
        self._db.execute(
            "INSERT OR IGNORE INTO files (path, size, mtime_ns, state, first_seen, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (_key(path), st.st_size, st.st_mtime_ns, PENDING, now, now),
        )

    def record(self, path: str, st: os.stat_result, sha256: str | None, p: Prediction, attempts: int = 0) -> None:
        """Store an outcome (prediction or read error) in one transaction: the crash-safe step."""
        outcome = _outcome_values(p)
        now = _now()
        self._db.execute(
            f"INSERT INTO files (path, size, mtime_ns, sha256, state, attempts, {', '.join(_OUTCOME)}, "
            f"first_seen, updated_at) VALUES ({', '.join('?' * (8 + len(_OUTCOME)))}) "
            "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
            "sha256 = excluded.sha256, state = excluded.state, attempts = excluded.attempts, "
            + ", ".join(f"{c} = excluded.{c}" for c in _OUTCOME)
            + ", updated_at = excluded.updated_at",
            (_key(path), st.st_size, st.st_mtime_ns, sha256, DONE if p.ok else ERROR, attempts, *outcome, now, now),
        )

    def copy_outcome(self, source: str, path: str, st: os.stat_result, sha256: str) -> None:
        """Give `path` the outcome already stored for the same content at `source` (a copy, or a
        move the watcher saw as a delete and a create): same image, same answer, no work."""
        with self.transaction() as db:
            r = db.execute(f"SELECT {', '.join(_OUTCOME)} FROM files WHERE path = ?", (_key(source),)).fetchone()
            now = _now()
            db.execute(
                "INSERT OR IGNORE INTO files (path, size, mtime_ns, state, first_seen, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (_key(path), st.st_size, st.st_mtime_ns, PENDING, now, now),
            )
            db.execute(
                f"UPDATE files SET size = ?, mtime_ns = ?, sha256 = ?, state = ?, attempts = 0, "
                f"{', '.join(f'{c} = ?' for c in _OUTCOME)}, updated_at = ? WHERE path = ?",
                (st.st_size, st.st_mtime_ns, sha256, DONE, *r, now, _key(path)),
            )

    def refresh(self, path: str, st: os.stat_result, state: str) -> None:
        """Same content as recorded (touched, copied back, share remounted): new size/mtime,
        the outcome restored to `state`."""
        self._db.execute(
            "UPDATE files SET size = ?, mtime_ns = ?, state = ?, updated_at = ? WHERE path = ?",
            (st.st_size, st.st_mtime_ns, state, _now(), _key(path)),
        )

    def failed_read(self, path: str, attempts: int) -> None:
        """Count a read that will be retried.  The row keeps its state and outcome: a pending
        row must not look finished (the reason goes to the log until the last try)."""
        self._db.execute("UPDATE files SET attempts = ?, updated_at = ? WHERE path = ?", (attempts, _now(), _key(path)))

    def vanish(self, paths: list[str]) -> int:
        """Mark files that are no longer under ROOT (their outcome kept); returns how many."""
        now = _now()
        with self.transaction() as db:
            return sum(
                db.execute(
                    "UPDATE files SET state = ?, updated_at = ? WHERE path = ? AND state != ?",
                    (VANISHED, now, _key(path), VANISHED),
                ).rowcount
                for path in paths
            )

    def vanish_under(self, folder: str) -> list[str]:
        """Vanish every row under a relative folder (a slide folder moved away or deleted)."""
        prefix = folder.rstrip("/") + "/"
        raw = os.fsencode(prefix)  # rows stored as bytes (names that are not UTF-8) compare byte-wise
        paths = [
            _rel(r[0])
            for r in self._db.execute(
                "SELECT path FROM files WHERE state != ? AND ((typeof(path) = 'text' AND substr(path, 1, ?) = ?) "
                "OR (typeof(path) = 'blob' AND substr(path, 1, ?) = ?))",
                (VANISHED, len(prefix), _key(prefix), len(raw), raw),
            )
        ]
        self.vanish(paths)
        return paths


_ROW_FIELDS = "path, size, mtime_ns, sha256, state, attempts, label, error, model_sha256"


def _key(rel: str) -> str | bytes:
    """A relative path as the ledger stores it: text, or its exact bytes for a name that is not
    UTF-8 (Linux allows any; SQLite's text would refuse it, and a watch must never stop on one file)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(rel)
    return rel


def _rel(stored: str | bytes) -> str:
    """The relative path a `_key` stored, as the file system spells it."""
    return os.fsdecode(stored) if isinstance(stored, bytes) else stored


def _outcome_values(p: Prediction) -> tuple:
    return (
        p.label,
        p.confidence,
        p.margin,
        json.dumps(p.probabilities) if p.probabilities else None,
        int(bool(p.needs_review)),
        p.review_reason,
        p.error,
        p.model,
        p.model_sha256,
        p.classified_at.isoformat(),
        p.ood_score,
        p.colour_score,
    )
