"""Writing files so that a crash or a full disk never leaves half of one, with one permission
policy, and hashing them.  Bundles, splits, checkpoints, histories and reports all go through here.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unwritable(folder: Path, create: bool = False) -> str | None:
    """Why nothing can be created in `folder` (made first with `create`), or None when it can."""
    try:
        if create:
            Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def new_file_mode(target: Path) -> int | None:
    """The mode a file written through a private temp file (0600) should get: the mode of the file
    it replaces, else an ordinary new file's (0666 less the umask), so colleagues on a shared lab
    drive can read a report, a bundle or a split.  None on Windows (no modes there)."""
    if os.name == "nt":
        return None
    try:
        st = Path(target).stat()
        if stat.S_ISREG(st.st_mode):
            return st.st_mode & 0o777
    except OSError:
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    # Read, not set-and-restore: os.umask() is process-wide and other threads create files too.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temp file beside `dest`, give it `new_file_mode(dest)` and move it into
    place: `dest` is either the old file or the whole new one.  On any failure the temp file is
    removed and the exception goes on."""
    dest = Path(dest)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        flush_to_disk(tmp)
        mode = new_file_mode(dest)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def flush_to_disk(path: Path) -> None:
    """On disk before the rename that publishes it: a power cut then leaves the old file or the
    whole new one, never an empty one."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_text_atomic(dest: Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8", newline="")

    return atomic_write(dest, write)
