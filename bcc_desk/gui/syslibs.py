"""Are the system libraries of Qt's X11 (xcb) platform plugin installed?  Asked before the
QApplication exists, because without them Qt aborts the process with a misleading one-liner
("xcb-cursor0 or libxcb-cursor0 is needed") while the libraries really missing are others.

No Qt here (the check must run before Qt loads anything); `bcc_desk.gui.app` prints the message.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

XCB_LIBRARIES: dict[str, tuple[str, str]] = {
    # soname: (Debian/Ubuntu package, Fedora package).  The system libraries that PySide6's
    # plugins/platforms/libqxcb.so loads (`ldd`), directly or through the Qt libraries it
    # brings (XcbQpa, Gui, DBus); the C/C++ runtime and zlib are left out (always there).
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb"),
    "libxcb.so.1": ("libxcb1", "libxcb"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libX11.so.6": ("libx11-6", "libX11"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libGL.so.1": ("libgl1", "libglvnd-glx"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libfreetype.so.6": ("libfreetype6", "freetype"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2"),
    "libgthread-2.0.so.0": ("libglib2.0-0", "glib2"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
}

XCB_SONAMES: tuple[str, ...] = tuple(XCB_LIBRARIES)

EXIT_MISSING_LIBRARIES = 2
"""`bcc-desk`'s exit code when they are missing (as for any other unusable setup)."""


def missing_libraries(sonames: Iterable[str] = XCB_SONAMES) -> list[str]:
    """The sonames the dynamic loader cannot load, as Qt would ask for them (a library whose own
    dependencies are missing counts as missing too: Qt could not load it either)."""
    missing = []
    for soname in sonames:
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing.append(soname)
    return missing


def debian_packages(sonames: Iterable[str] = XCB_SONAMES) -> list[str]:
    return list(dict.fromkeys(XCB_LIBRARIES[s][0] for s in sonames if s in XCB_LIBRARIES))


def fedora_packages(sonames: Iterable[str] = XCB_SONAMES) -> list[str]:
    return list(dict.fromkeys(XCB_LIBRARIES[s][1] for s in sonames if s in XCB_LIBRARIES))


def missing_message(missing: Sequence[str]) -> str:
    """One message for the terminal: what is missing and the commands that install it."""
    lines = [
        "bcc-desk: error: the desktop app cannot open a window: Qt's X11 (xcb) platform plugin "
        f"needs system libraries that are not installed: {', '.join(missing)}.",
    ]
    debian, fedora = debian_packages(missing), fedora_packages(missing)
    if debian:
        lines += ["Install them, then start bcc-desk again:",
                  f"  Debian/Ubuntu:  sudo apt install {' '.join(debian)}",
                  f"  Fedora:         sudo dnf install {' '.join(fedora)}"]
    unknown = [s for s in missing if s not in XCB_LIBRARIES]
    if unknown:
        lines.append(f"  (install the package that provides {', '.join(unknown)} for your system)")
    lines.append("The command line (`bcc classify`) needs none of them.")
    return "\n".join(lines)


def uses_xcb(environ: Mapping[str, str], platform: str) -> bool:
    """Whether Qt will load its xcb plugin: on Linux, with QT_QPA_PLATFORM unset or 'xcb'
    (not offscreen, wayland, ...).  Unset in a Wayland session, Qt picks Wayland first."""
    if not platform.startswith("linux"):
        return False
    asked = environ.get("QT_QPA_PLATFORM", "").strip()
    if not asked:
        return not environ.get("WAYLAND_DISPLAY")
    first = asked.split(";")[0].split(":")[0].strip()  # "xcb:option=value;wayland" -> "xcb"
    return first == "xcb"


def check_xcb(environ: Mapping[str, str] | None = None, platform: str | None = None,
              sonames: Iterable[str] | None = None) -> str | None:
    """The message to print before Qt would abort, or None when all is well (or xcb unused)."""
    if not uses_xcb(os.environ if environ is None else environ, sys.platform if platform is None else platform):
        return None
    missing = missing_libraries(XCB_SONAMES if sonames is None else sonames)
    return missing_message(missing) if missing else None
