"""bcc-desk's desktop app (PySide6).  Qt is imported only inside this package.

`from bcc_desk.gui import MainWindow` is the automation entry point.  The import is lazy so that
`import bcc_desk.gui` (or anything in the core) never pulls in Qt by accident.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bcc_desk.gui.refcount_guard import make_singletons_immortal

# Before any Qt module loads: PySide6 6.12 loses references to None/True/False on CPython < 3.12.
make_singletons_immortal()

if TYPE_CHECKING:
    from bcc_desk.gui.main_window import MainWindow

__all__ = ["MainWindow"]


def __getattr__(name: str) -> Any:
    if name == "MainWindow":
        from bcc_desk.gui.main_window import MainWindow

        return MainWindow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
