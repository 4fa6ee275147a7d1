"""File > Export report…: ask where, check it, write in the export thread, say what happened
(the report may have gone beside the asked path: a workbook open in Excel is never overwritten)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QMainWindow

from bcc_desk.gui.desk import Desk
from bcc_desk.gui.jobs import submit

FILE_TYPES = {"Excel workbook (*.xlsx)": ".xlsx", "CSV, images only (*.csv)": ".csv", "PDF report (*.pdf)": ".pdf"}


def choose_export(window: QMainWindow, desk: Desk, notify: Callable[[str], None]) -> None:
    """Ask for a path (the chosen type's suffix added when it has none) and write the report there."""
    try:
        snapshot = desk.snapshot()
    except ValueError as exc:
        notify(str(exc))
        return
    default = desk.default_report_path()
    path, chosen = QFileDialog.getSaveFileName(window, "Export report", str(default or ""), ";;".join(FILE_TYPES))
    if not path:
        return
    out = Path(path)
    if out.suffix.lower() not in FILE_TYPES.values():  # no suffix, or another: the chosen type's
        out = out.with_name(out.name + FILE_TYPES.get(chosen, ".xlsx"))
    try:
        desk.check_export_target(out)
    except ValueError as exc:
        notify(str(exc))
        return
    window.statusBar().showMessage(f"Writing {out}\u2026")

    def written(result: tuple[Path, str | None]) -> None:
        path, diverted = result
        desk.session.exported(snapshot)
        if diverted:  # open in Excel (written beside it); no space, read-only, gone (a fallback folder)
            notify(f"{diverted}; the report was written to {path} instead")
        else:
            window.statusBar().showMessage(f"Report written: {path}", 15000)

    submit(desk.export_pool, lambda: snapshot.write(out), written,
           lambda reason: notify(f"{reason}; the reviews are kept: export again elsewhere"))
