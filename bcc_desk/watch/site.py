"""Where one watch reads and writes: ROOT and the report's folder checked, the state's lock
held, the daemon's log file (`claim_watch` runs before any model is loaded)."""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bcc_desk.files import unwritable
from bcc_desk.paths import user_data_dir
from bcc_desk.report_target import REPORT_SUFFIXES


class WatchError(Exception):
    """The watch cannot start (state in use by another daemon, ...)."""


class ReportFolderError(WatchError):
    """The report cannot be written where it is asked for (the CLI adds: use --out)."""


def default_state(root: Path) -> Path:
    """Where the ledger of ROOT lives unless --state says otherwise (the log sits beside it)."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return user_data_dir() / "watch" / key / "ledger.sqlite"


def default_report(root: Path) -> Path:
    """Where the report of a watch on ROOT goes unless --out says otherwise."""
    return Path(root) / "bcc-report.xlsx"


@dataclass(frozen=True)
class WatchTiming:
    """How a watch sees files arrive: system events, or polling every `interval` seconds (network
    shares send no events); how long an unchanged file waits before it is read (`settle`, see
    `Settler`); and how long the report waits for quiet before it is rewritten (`quiet`)."""

    polling: bool = False
    interval: float = 1.0
    settle: float = 2.0
    quiet: float = 1.0


@dataclass(frozen=True)
class WatchSite:
    """Where one watch reads and writes, checked, with its locks held until `release`: ROOT's
    (one watch per folder, whatever its --state) and the state's, when that is another file."""

    root: Path
    out: Path
    state: Path
    locks: tuple[TextIO, ...]

    def release(self) -> None:
        """Give up the locks and remove their files (a clean stop leaves nothing behind; a crash
        leaves the files, unlocked, and the next start takes them)."""
        for lock in reversed(self.locks):
            path = Path(lock.name)
            if os.name != "nt":
                path.unlink(missing_ok=True)  # still locked here: no second watch can slip in between
            lock.close()
            if os.name == "nt":
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # another process opened it meanwhile: harmless
                    pass


def claim_watch(root: Path, out: Path | None = None, state: Path | None = None) -> WatchSite:
    """Check ROOT and the report's folder and take the lock of the state (default: the per-user
    ledger of ROOT; the report: `default_report`), before any model is loaded: a service must
    say at start, not in a week, that it cannot work.  Raises WatchError with a one-line reason
    (ReportFolderError about the report's folder)."""
    root = Path(root)
    if not root.is_dir():
        raise WatchError(f"{root} is not a folder" if root.exists() else f"{root} does not exist")
    root = root.resolve()
    out = Path(out or default_report(root)).resolve()
    if out.suffix.lower() not in REPORT_SUFFIXES:
        raise WatchError(f"--out {out.name}: a report is .xlsx, .csv or .pdf")
    if not out.parent.is_dir():
        raise ReportFolderError(f"the report's folder {out.parent} does not exist")
    if problem := unwritable(out.parent):
        raise ReportFolderError(f"cannot write the report in {out.parent} ({problem})")
    state = Path(state or default_state(root)).resolve()
    # ROOT's lock sits where its default ledger would: a second watch with another --state
    # would classify the same arrivals and write the same report.
    mine = default_state(root).resolve()
    watching = f"another bcc watch (or bcc-desk) is already watching {root}"
    locks: list[TextIO] = []
    if state != mine:
        try:
            locks.append(_hold(mine.with_suffix(".lock"), watching))
        except OSError:  # no per-user data folder to write (a service account, --state elsewhere): the state's lock alone
            pass
    try:
        locks.append(lock_state(state) if state != mine else _hold(mine.with_suffix(".lock"), watching))
    except WatchError:
        for lock in locks:
            lock.close()
        raise
    return WatchSite(root, out, state, tuple(locks))


def log_file(state: Path) -> Path:
    return Path(state).with_suffix(".log")


def log_to_file(path: Path) -> logging.Handler:
    """Also log to `path` (rotated at 5 MB, 3 kept: the daemon runs for weeks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(path, maxBytes=5_000_000, backupCount=3, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("bcc_desk")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


class _LogFile(logging.handlers.RotatingFileHandler):
    """The daemon's log file.  A line its disk cannot take (full: often the ledger's disk too)
    is dropped, not answered with a traceback on the console per line: the console has it."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def lock_state(state: Path) -> TextIO:
    """Hold an exclusive lock beside the state file for the life of the daemon, so a second
    daemon on the same ROOT cannot classify and record alongside the first.  The kernel drops
    the lock when the process dies, however it dies."""
    return _hold(Path(state).with_suffix(".lock"), f"another bcc watch (or bcc-desk) is already using the state file {state}")


def _hold(lock: Path, busy: str) -> TextIO:
    """An exclusive lock on the file `lock`, held while the returned file is open; WatchError
    `busy` when another process holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "a+")  # noqa: SIM115 - held open (locked) until the process ends
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise WatchError(busy) from None
    return fh
