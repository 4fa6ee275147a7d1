"""The check of Qt's X11 system libraries that `bcc-desk` makes before Qt could abort: against the
real dynamic loader, the real PySide6 plugin (`ldd`) and a real `bcc-desk` process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bcc_desk.gui.syslibs import (
    XCB_SONAMES,
    check_xcb,
    debian_packages,
    fedora_packages,
    missing_libraries,
    missing_message,
)

from conftest import REPO

NO_SUCH_LIBRARY = "libbcc-desk-no-such-library.so.7"



def _ldd_of_xcb_plugin() -> str:
    import PySide6

    plugin = Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    assert plugin.is_file(), f"PySide6 ships no xcb plugin at {plugin}"
    assert shutil.which("ldd") is not None, "ldd (glibc's, on every Linux) is needed to read what the plugin loads"
    return subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, check=True).stdout


def test_the_list_is_what_the_plugin_loads_and_missing_is_what_ldd_cannot_find() -> None:
    resolved: dict[str, str] = {}  # soname -> where ldd found it, or "not found"
    for line in _ldd_of_xcb_plugin().splitlines():
        m = re.match(r"\s*(\S+) => (.+?)(?: \(0x[0-9a-f]+\))?$", line)
        if m:
            resolved[m.group(1)] = m.group(2)
    assert "libQt6XcbQpa.so.6" in resolved  # the parse worked
    assert set(XCB_SONAMES) <= set(resolved), "every library checked is one the plugin really loads"
    bundled = [s for s in XCB_SONAMES if "PySide6" in resolved[s]]
    assert bundled == [], "only system libraries: the bundled Qt ones are always there"
    not_found = [s for s in XCB_SONAMES if resolved[s] == "not found"]
    assert missing_libraries() == not_found  # [] on a machine where ldd resolves them all


def test_a_library_that_does_not_exist_is_reported_missing() -> None:
    libc = "libc.so.6" if sys.platform.startswith("linux") else None
    asked = [NO_SUCH_LIBRARY, *([libc] if libc else [])]
    assert missing_libraries(asked) == [NO_SUCH_LIBRARY]
    message = missing_message([NO_SUCH_LIBRARY])
    assert NO_SUCH_LIBRARY in message and len(message.splitlines()) < 6


def test_the_message_gives_the_install_commands_for_what_is_missing() -> None:
    message = missing_message(["libxcb-icccm.so.4", "libxcb-keysyms.so.1"])
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1" in message
    assert "sudo apt install libxcb-icccm4 libxcb-keysyms1\n" in message
    assert "sudo dnf install xcb-util-wm xcb-util-keysyms\n" in message


def test_only_the_xcb_plugin_on_linux_is_checked() -> None:
    gone = [NO_SUCH_LIBRARY]
    for environ in ({}, {"QT_QPA_PLATFORM": "xcb"}, {"QT_QPA_PLATFORM": "xcb:dpi=96;wayland"}):
        assert NO_SUCH_LIBRARY in (check_xcb(environ, "linux", gone) or ""), environ
    for environ in ({"QT_QPA_PLATFORM": "offscreen"}, {"QT_QPA_PLATFORM": "wayland"},
                    {"WAYLAND_DISPLAY": "wayland-0"}):  # unset in a Wayland session: Qt takes Wayland
        assert check_xcb(environ, "linux", gone) is None, environ
    for platform in ("win32", "darwin"):
        assert check_xcb({}, platform, gone) is None
    if not missing_libraries():
        assert check_xcb({"QT_QPA_PLATFORM": "xcb"}, "linux") is None


def test_bcc_desk_exits_2_with_one_message_instead_of_a_qt_abort(tmp_path: Path) -> None:
    """A real `bcc-desk` process, on X11, with one library the loader cannot find: without the
    check Qt would abort it (SIGABRT, rc 134) with its misleading hint."""
    code = ("import sys; import bcc_desk.gui.syslibs as s; "
            f"s.XCB_SONAMES = (*s.XCB_SONAMES, {NO_SUCH_LIBRARY!r}); "
            "from bcc_desk.gui.app import main; sys.exit(main([]))")
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "DISPLAY")}
    env.update(QT_QPA_PLATFORM="xcb", XDG_CONFIG_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert NO_SUCH_LIBRARY in done.stderr and "Traceback" not in done.stderr and "xcb-cursor0" not in done.stderr
    assert done.stderr.startswith("bcc-desk: error:") and done.stdout == ""


def test_the_check_never_imports_qt() -> None:
    code = "import sys, bcc_desk.gui.syslibs; sys.exit(any(m.startswith('PySide6') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_readme_lists_every_package() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    apt = re.search(r"^ *sudo apt install (libxcb.+)$", text, re.MULTILINE)
    dnf = re.search(r"^ *sudo dnf install (xcb.+)$", text, re.MULTILINE)
    assert apt and apt.group(1).split() == debian_packages()
    assert dnf and dnf.group(1).split() == fedora_packages()
    assert "xvfb-run" in text
