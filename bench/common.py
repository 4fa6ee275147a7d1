"""What every benchmark shares: where the real images are, the machine's name, and how figures
are published (printed, and with --write added to bench/RESULTS.md in their issue's section, or
for the validation studies written to --out)."""

from __future__ import annotations

import argparse
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


def validation_study_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every validation-only study of a bundle takes: BUNDLE DATA --split SPLIT.csv
    [--precision fp32|int8] [--out MD]; a study adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    return ap


def print_table(lines: list[str], out: Path | None) -> None:
    """Print a study's markdown lines, and write them to `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text, encoding="utf-8")
