"""Keep PySide6 from freeing None, True and False on CPython 3.10/3.11.

PySide6 6.12's abi3 wheels hand back None, True and False from many calls without taking a
reference: harmless on CPython 3.12+, where these objects are immortal (PEP 683), but on 3.11
every such call lowers their reference count by one.  Measured here with PySide6 6.12.0 on
CPython 3.11.7: about 3,600 references to None lost per pass over a 12-image folder (one per
`setText`, `QTimer.start`, model `data()` returning None, ...), so a session aborts within
minutes with "Fatal Python error: none_dealloc: deallocating None" (a 5,000-image run did).

The cure is what 3.12 does by design: give the three objects a reference count so large that
no session can use it up.  They are static objects that CPython never frees, so nothing else
changes.  No Qt is imported here; `bcc_desk.gui` applies it before any Qt module is loaded.
"""

from __future__ import annotations

import ctypes
import sys

_BOOST = 1 << 40  # ~10^12 lost references: centuries of clicks
_FLOOR = 1 << 39


def make_singletons_immortal() -> bool:
    """Raise the reference counts of None/True/False far out of reach (CPython < 3.12 only).
    Returns whether anything was done."""
    if sys.implementation.name != "cpython" or sys.version_info >= (3, 12):
        return False
    for obj in (None, True, False):
        # On CPython < 3.12 the object header starts with its Py_ssize_t reference count.
        count = ctypes.c_ssize_t.from_address(id(obj))
        if count.value < _FLOOR:
            count.value += _BOOST
    return True
