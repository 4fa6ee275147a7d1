"""Can this computer compile the network?  torch.compile (and the int8 build, which is compiled)
needs a C++ compiler on a CPU; most Windows lab PCs have none.  Without this check every run tried,
failed after seconds and printed half a reason.  A missing compiler is seen at once; any other
compile failure is remembered per torch version and compiler, so no later run pays for it again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from bcc_desk.paths import user_data_dir

INSTALL_HINT = (
    "install one for the faster path (Debian/Ubuntu: sudo apt install g++; Fedora: sudo dnf install gcc-c++; "
    "macOS: xcode-select --install; Windows: Visual Studio Build Tools, 'Desktop development with C++')"
)


def cpp_compiler() -> str:
    """The compiler torch's CPU back-end looks for (inductor's own default)."""
    if sys.platform == "win32":
        return os.environ.get("CXX", "cl")
    return os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")


def memo_path() -> Path:
    return user_data_dir() / "compile-failures.json"


def _compile_key(device: torch.device) -> str:
    compiler = shutil.which(cpp_compiler()) if device.type == "cpu" else "triton"
    return f"compile: torch {torch.__version__} {device.type} {compiler}"


def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile (and so the int8 build) cannot work here, in one line; None: it may."""
    if device.type == "cpu" and shutil.which(cpp_compiler()) is None:
        return f"no C++ compiler was found ({cpp_compiler()}); {INSTALL_HINT}"
    return failed_before(_compile_key(device))


def remember_compile_failure(device: torch.device, reason: str) -> None:
    remember_failure(_compile_key(device), reason)


def failed_before(key: str) -> str | None:
    """The one-line account of an earlier failure of `key` on this computer (None: none)."""
    reason = _read_memo().get(key)
    if reason:
        return f"it failed on this computer before ({reason}); delete {memo_path()} to try again"
    return None


def remember_failure(key: str, reason: str) -> None:
    """Keep `reason` under `key` (one that names what failed: torch version and compiler, or an
    int8 package).  Best effort, and a plain write: a read-only home or a torn file only means
    that the next run tries again."""
    memo = _read_memo()
    memo[key] = reason
    try:
        memo_path().parent.mkdir(parents=True, exist_ok=True)
        memo_path().write_text(json.dumps(memo, indent=1, sort_keys=True), encoding="utf-8")
    except OSError:
        pass


def _read_memo() -> dict[str, str]:
    try:
        memo = json.loads(memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def failure_reason(exc: BaseException) -> str:
    """The informative line of a compile error (dynamo's first line is only 'backend raised:')."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.endswith("raised:") and not ln.startswith(("Set TORCH", "You can suppress"))]
    return (useful[0] if useful else type(exc).__name__)[:200]
