"""What every benchmark shares: where the real images are, the machine's name, and how figures
are published (printed, and with --write appended to bench/RESULTS.md)."""

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


def publish(text: str, write: bool) -> None:
    """Print a benchmark's section; with `write`, append it to bench/RESULTS.md."""
    print(text)
    if write:
        old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n", encoding="utf-8")
        print(f"appended to {RESULTS}")
