"""Waiting on a watch and reading back what it recorded: the ledger's rows, the report's (not a
test module)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import openpyxl
import pytest

from bcc_desk.watch.ledger import DONE, Ledger, Row

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return value


def rows(state: Path) -> dict[str, Row]:
    if not state.exists():
        return {}
    ledger = Ledger(state)
    try:
        return ledger.rows()
    finally:
        ledger.close()


def all_done(state: Path, names: set[str]) -> bool:
    r = rows(state)
    return all(n in r and r[n].state == DONE for n in names)


def report_rows(path: Path) -> list[dict]:
    wb = openpyxl.load_workbook(path, read_only=True)
    try:
        values = wb["Images"].iter_rows(values_only=True)
        header = next(values)
        return [dict(zip(header, v)) for v in values]
    finally:
        wb.close()


def report_files(path: Path) -> list[str]:
    return sorted(r["file"] for r in report_rows(path)) if path.exists() else []
