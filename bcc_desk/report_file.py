"""Where a report file lands: written whole beside its target and moved into place, or, when
the target is open in Excel or LibreOffice or cannot be replaced, beside it under a dated name
(the written path is returned and a warning says where)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bcc_desk.files import flush_to_disk, new_file_mode

log = logging.getLogger("bcc_desk.report")  # the report's warnings, one logger for its writers


class ReportError(Exception):
    """The report could not be written at all (folder missing or not writable)."""


def locked_target(out: Path) -> bool:
    """True when Excel or LibreOffice has `out` open (its owner/lock file sits beside it)."""
    return _lock_file(Path(out)) is not None


def _lock_file(out: Path) -> Path | None:
    """The Office owner file (`~$...`) or LibreOffice lock (`.~lock.<name>#`) beside `out`."""
    name = out.name
    candidates = [f"~${name}", f".~lock.{name}#"]
    # Word-style owner files drop the first one or two characters of longer names; sources
    # disagree on Excel's rule, and a false alarm only costs a sibling file while a missed lock
    # lets Excel's next save overwrite the new report, so every form counts.
    if len(out.stem) > 2:
        candidates += [f"~${name[1:]}", f"~${name[2:]}"]
    for c in candidates:
        lock = out.with_name(c)
        if lock.is_file():
            return lock
    return None


def _sibling(out: Path) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d %H%M%S")
    return out.with_name(f"{out.stem} ({stamp}){out.suffix}")


def _diversion(out: Path, fallback: Path | None) -> Path:
    if fallback is not None:
        fallback = Path(fallback)
        if fallback != out and fallback.parent == out.parent and _lock_file(fallback) is None:
            return fallback
    return _sibling(out)


def _temp_prefix(out: Path) -> str:
    return f".{out.stem}."


def remove_orphaned_temps(out: Path) -> list[Path]:
    """Remove the temporary files a writer of `out` killed mid-write left beside it (hidden,
    `.<stem>.<8 random characters><suffix>`); returns them.  Only for a caller that alone
    writes `out` (the watch, which holds its folder's lock)."""
    out = Path(out)
    name = re.compile(re.escape(_temp_prefix(out)) + r"[a-z0-9_]{8}" + re.escape(out.suffix))
    removed = []
    for candidate in out.parent.glob(f"{_temp_prefix(out)}*{out.suffix}"):
        if name.fullmatch(candidate.name) and candidate.is_file() and not candidate.is_symlink():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: left as it is
                candidate.unlink()
                removed.append(candidate)
    return removed


def atomic_report_write(out: Path, write: Callable[[Path], None], fallback: Path | None) -> Path:
    """Run `write` on a temp file beside `out`, then move it into place (or beside, if locked)."""
    folder = out.parent
    if not folder.is_dir():
        raise ReportError(f"cannot write the report: folder {folder} does not exist")
    dest = out
    lock = _lock_file(out)
    if lock is not None:
        dest = _diversion(out, fallback)
    try:
        with tempfile.NamedTemporaryFile(
            dir=folder, prefix=_temp_prefix(out), suffix=out.suffix, delete=False
        ) as fh:
            tmp = Path(fh.name)
    except OSError as e:
        raise ReportError(f"cannot write the report in folder {folder}: {e.strerror or e}") from e
    try:
        try:
            write(tmp)
            flush_to_disk(tmp)
        except OSError as e:  # no space left, the folder removed or made read-only meanwhile
            raise ReportError(f"cannot write the report {out}: {e.strerror or e}") from e
        mode = new_file_mode(dest)
        if mode is not None:
            os.chmod(tmp, mode)
        try:
            os.replace(tmp, dest)
        except OSError as e:
            if dest != out:
                raise ReportError(f"cannot write the report {dest}: {e.strerror or e}") from e
            dest = _diversion(out, fallback)
            try:
                os.replace(tmp, dest)
            except OSError as e2:
                raise ReportError(f"cannot write the report {dest}: {e2.strerror or e2}") from e2
            log.warning(
                "report target %s could not be replaced (%s, open in another program?); "
                "wrote the report to %s instead", out, e.strerror or e, dest,
            )
        else:
            if lock is not None:
                log.warning(
                    "report target %s is open in another program (lock file %s); "
                    "wrote the report to %s instead", out, lock.name, dest,
                )
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return dest
