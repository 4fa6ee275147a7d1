"""Soak `bcc watch`: thousands of real images arriving while the daemon is killed again and again.

    python bench/soak_watch.py [--images 10000] [--kill-every 10] [--model BUNDLE] [--write]

The data set's images under distinct names (repeated to reach --images; a repeat's content is
already in the ledger, so it takes the stored answer), arriving as a camera's export folder sees
them: a third copied in, a third written elsewhere and moved in, a third written slowly in two
parts.  Meanwhile the daemon (`python -m bcc_desk watch`, its defaults, the shipped model) is
SIGKILLed --kill-every seconds after each start is ready (so every life does some work) and
started again at once, until every image has arrived and --kill-until of them are recorded; for
a while an Excel lock file sits beside the report.  Then the daemon catches up and is stopped
with SIGINT.  Then the report is read back: rows, images present, duplicates, error
rows, kills and wall time.  Target: every image exactly once, no error rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

import openpyxl

from common import ALL4, REPO, cpu_name, publish

DEFAULT_MODEL = REPO / "resources" / "models" / "default"


def real_images() -> list[Path]:
    per_class = [sorted(d.glob("*.jpg")) for d in sorted(ALL4.iterdir()) if d.is_dir()]
    longest = max(len(files) for files in per_class)
    return [files[i] for i in range(longest) for files in per_class if i < len(files)]


class Soak:
    def __init__(self, work: Path, model: Path, n: int) -> None:
        self.work, self.model = work, model
        self.root, self.staging = work / "export", work / "staging"
        self.out, self.state = work / "report.xlsx", work / "state" / "ledger.sqlite"
        self.root.mkdir()
        self.staging.mkdir()
        images = real_images()
        self.plan = [(images[i % len(images)], f"slide-{i % 20:02d}/{i:05d}-{images[i % len(images)].name}")
                     for i in range(n)]
        self.proc: subprocess.Popen | None = None
        self.starts = self.kills = 0
        self.fed = threading.Event()

    # -- the daemon -----------------------------------------------------------------------------
    def start(self) -> None:
        self.starts += 1
        console = open(self.work / f"console-{self.starts}.txt", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bcc_desk", "watch", str(self.root), "--out", str(self.out), "--model",
             str(self.model), "--state", str(self.state)], cwd=REPO, stdout=console, stderr=subprocess.STDOUT)
        console.close()

    def ready(self) -> bool:
        """The latest start has its network ready (its log says so once per start)."""
        log = self.state.with_suffix(".log")
        return log.exists() and log.read_text(errors="replace").count("INFO ready") >= self.starts

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    # -- arrivals -------------------------------------------------------------------------------
    def feed(self) -> None:
        """Every image, one after another: copy, move in, or a slow two-part write."""
        slow: list[threading.Thread] = []
        for i, (src, name) in enumerate(self.plan):
            target = self.root / name
            target.parent.mkdir(exist_ok=True)
            if i % 3 == 0:
                shutil.copyfile(src, target)
            elif i % 3 == 1:
                staged = self.staging / f"{i}.jpg"
                shutil.copyfile(src, staged)
                os.replace(staged, target)
            else:
                thread = threading.Thread(target=_slow_write, args=(src, target))
                thread.start()
                slow.append(thread)
                slow = [t for t in slow if t.is_alive()]
            time.sleep(0.005)
        for thread in slow:
            thread.join()
        self.fed.set()

    def done_count(self) -> int:
        if not self.state.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{self.state}?mode=ro", uri=True, timeout=10) as db:
                return db.execute("SELECT COUNT(*) FROM files WHERE state IN ('done', 'error')").fetchone()[0]
        except sqlite3.Error:
            return 0


def _slow_write(src: Path, target: Path) -> None:
    data = src.read_bytes()
    with open(target, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(0.4)  # the camera's second half, after the settle-free part of a write
        fh.write(data[len(data) // 2:])


def run(model: Path, n: int, kill_every: float, kill_until: float, lock_after: float, lock_for: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bcc-soak-") as tmp:
        soak = Soak(Path(tmp), model, n)
        started = time.perf_counter()
        soak.start()
        feeder = threading.Thread(target=soak.feed)
        feeder.start()
        lock = soak.out.with_name(f"~${soak.out.name}")
        next_kill: float | None = None
        locked = False
        fed_s = 0.0
        while not soak.fed.is_set() or soak.done_count() < kill_until * n:
            now = time.perf_counter()
            if soak.fed.is_set() and not fed_s:
                fed_s = now - started
            if not locked and lock_after <= now - started < lock_after + lock_for:
                lock.write_bytes(b"\x05alice")  # Excel's owner file: the workbook is open
                locked = True
            if locked and now - started >= lock_after + lock_for and lock.exists():
                lock.unlink()
            if next_kill is None and soak.ready():
                next_kill = now + kill_every
            if next_kill is not None and now >= next_kill:
                soak.kill()
                soak.start()
                next_kill = None
            assert soak.proc is not None and soak.proc.poll() is None, "the daemon died on its own"
            time.sleep(0.1)
        feeder.join()
        fed_s = fed_s or time.perf_counter() - started
        lock.unlink(missing_ok=True)
        while soak.done_count() < n:  # no more kills: it catches up
            assert soak.proc is not None and soak.proc.poll() is None, "the daemon died on its own"
            time.sleep(0.5)
        assert soak.proc is not None
        soak.proc.send_signal(signal.SIGINT)
        rc = soak.proc.wait(120)
        wall = time.perf_counter() - started
        wb = openpyxl.load_workbook(soak.out, read_only=True)
        values = wb["Images"].iter_rows(values_only=True)
        header = next(values)
        rows = [dict(zip(header, v, strict=False)) for v in values]
        wb.close()
        files = Counter(r["file"] for r in rows)
        expected = {name for _, name in soak.plan}
        consoles = "".join(p.read_text(errors="replace") for p in Path(tmp).glob("console-*.txt"))
        return {
            "images": n, "rows": len(rows), "present": len(expected & set(files)),
            "duplicated": sum(c > 1 for c in files.values()), "errors": sum(r["error"] is not None for r in rows),
            "missing": len(expected - set(files)), "extra": len(set(files) - expected),
            "kills": soak.kills, "starts": soak.starts, "fed_s": fed_s, "wall_s": wall, "exit": rc,
            "tracebacks": consoles.count("Traceback"), "kill_every": kill_every, "kill_until": kill_until,
            "lock": f"{lock_after:g}-{lock_after + lock_for:g} s",
        }


def markdown(r: dict, model: Path) -> str:
    met = r["present"] == r["images"] == r["rows"] and not r["duplicated"] and not r["errors"]
    return "\n".join([
        f"### `bcc watch` soak, {date.today().isoformat()}",
        "",
        (f"Machine: {cpu_name()}, {os.cpu_count()} cores; model: {model.name}; load average "
         f"{os.getloadavg()[0]:.1f} at the end. {r['images']:,} images (the data set's under distinct names: "
         "a third copied in, a third moved in, a third written slowly in two parts) while the daemon was "
         f"SIGKILLed {r['kill_every']:g} s after each start was ready and restarted at once, until every image "
         f"had arrived and {r['kill_until']:.0%} were recorded; an Excel lock file beside the report "
         f"from {r['lock']}; then a clean stop (SIGINT, exit {r['exit']})."),
        "",
        "| measure | value |",
        "|---|---:|",
        f"| rows in the report | {r['rows']:,} |",
        f"| images present / missing / not expected | {r['present']:,} / {r['missing']} / {r['extra']} |",
        f"| images listed more than once | {r['duplicated']} |",
        f"| error rows | {r['errors']} |",
        f"| kills (SIGKILL) / starts | {r['kills']} / {r['starts']} |",
        f"| tracebacks on the consoles | {r['tracebacks']} |",
        f"| all images arrived after | {r['fed_s']:.0f} s |",
        f"| wall time, to the final report | {r['wall_s']:.0f} s |",
        "",
        f"Target: every image exactly once, no error rows: {'**met**' if met else '**not met**'}.",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--kill-every", type=float, default=10.0)
    ap.add_argument("--kill-until", type=float, default=0.9, help="share of images recorded when the kills stop")
    ap.add_argument("--lock-after", type=float, default=60.0, help="seconds into the soak the lock file appears")
    ap.add_argument("--lock-for", type=float, default=60.0)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    result = run(args.model, args.images, args.kill_every, args.kill_until, args.lock_after, args.lock_for)
    print(result)
    publish(markdown(result, args.model), args.write, "## `bcc watch`")


if __name__ == "__main__":
    main()
