"""What every benchmark shares: where the real images are, the machine's name, and how figures
are published (printed, and with --write added to bench/RESULTS.md in their issue's section)."""

from __future__ import annotations

import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL4 = REPO.parent / "shared" / "data" / "all4"
RESULTS = REPO / "bench" / "RESULTS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def publish(text: str, write: bool, section: str | None = None) -> None:
    """Print a benchmark's figures; with `write`, add them to bench/RESULTS.md at the end of the
    `## ` section whose heading starts with `section` (RESULTS is organised by issue), or at the
    end of the file when there is no such section."""
    print(text)
    if not write:
        return
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    lines = old.rstrip("\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if section and ln.startswith(section)), None)
    end = len(lines) if start is None else next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head = "\n".join(lines[:end]).rstrip("\n")
    tail = "\n".join(lines[end:])
    RESULTS.write_text(head + "\n\n" + text.rstrip("\n") + "\n" + ("\n" + tail + "\n" if tail else ""),
                       encoding="utf-8")
    print(f"written to {RESULTS}")
