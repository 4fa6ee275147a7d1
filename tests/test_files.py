"""The one way files are written: whole or not at all, with the permissions of an ordinary file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bcc_desk.files import atomic_write, write_text_atomic

from bundles import make_bundle


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ordinary() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "split.csv", "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("new but cut")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.csv"]


def test_new_files_are_readable_as_the_umask_allows_and_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "report.csv", "a\n")
    assert _mode(target) == _ordinary()  # not the 0600 of a private temporary file
    target.chmod(0o640)
    write_text_atomic(target, "b\n")
    assert _mode(target) == 0o640 and target.read_text() == "b\n"


def test_bundles_and_splits_are_written_through_it(tmp_path: Path) -> None:
    from trainer.split import make_split

    from conftest import ALL4

    bundle = make_bundle(tmp_path / "bundle")
    for name in ("bundle.json", "model.safetensors"):
        assert _mode(bundle / name) == _ordinary(), name
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]
    split = make_split(ALL4, seed=0).save(tmp_path / "run" / "split.csv")
    assert _mode(split) == _ordinary() and split.read_text(encoding="utf-8").startswith("path,class,")
