"""Benchmark `bcc watch` with the shipped model: latency of single images, rate of a burst.

    python bench/bench_watch.py [--drops 30] [--burst 500] [--repeats 2] [--write]

The daemon runs as a user runs it (`python -m bcc_desk watch ROOT`, defaults, its own process,
model loaded) and this script watches its ledger and report from outside:
  * latency: DROPS real images written into ROOT one at a time; the clock starts when the
    writer closes the file and stops when the image's ledger row is committed, and when the
    report on disk lists it; p50 and p95 of each;
  * burst: BURST real images copied into ROOT at once; images per second from the first copy to
    the last committed row, against `bcc classify` on the same images in the same repeat (a
    fresh process with its defaults, report included: what a user would run instead) and
    against classify's engine with the model already loaded (compiled, as classify does for
    runs this size); each repeat uses images the daemon has not seen (it would otherwise
    recognise them by content and not classify them at all);
  * shutdown: SIGINT to exit.
Figures go to stdout and, with --write, into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openpyxl
import torch

from bcc_desk.bundle import load_bundle
from bcc_desk.classifier import Classifier
from bcc_desk.watch.site import log_file

from bench_classify import e2e_rate
from common import ALL4, REPO, cpu_name, publish


def real_images() -> list[Path]:
    """Every image of the data set, classes interleaved, so any slice mixes them."""
    per_class = [sorted(d.glob("*.jpg")) for d in sorted(ALL4.iterdir()) if d.is_dir()]
    longest = max(len(files) for files in per_class)
    return [files[i] for i in range(longest) for files in per_class if i < len(files)]


def place(images: list[Path], folder: Path) -> list[str]:
    """Copy into four slide folders; the relative names."""
    names = []
    for i, f in enumerate(images):
        name = f"slide-{i % 4}/{f.name}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, folder / name)
        names.append(name)
    return names


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Daemon:
    def __init__(self, work: Path, model: Path) -> None:
        self.root, self.out, self.state = work / "root", work / "report.xlsx", work / "state" / "ledger.sqlite"
        (self.root / "drops").mkdir(parents=True)  # a camera writes into a folder that exists
        cmd = [sys.executable, "-m", "bcc_desk", "watch", str(self.root), "--out", str(self.out),
               "--model", str(model), "--state", str(self.state)]
        self.console = open(work / "console.txt", "wb")  # noqa: SIM115 - open as long as the daemon
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.console, stderr=subprocess.STDOUT)
        log = log_file(self.state)
        while not (log.exists() and "INFO ready" in log.read_text()):  # network compiled
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode}: see {work / 'console.txt'}")
            time.sleep(0.1)
        self.db = sqlite3.connect(self.state, isolation_level=None)

    def done(self, name: str) -> bool:
        row = self.db.execute("SELECT state FROM files WHERE path = ?", (name,)).fetchone()
        return row is not None and row[0] == "done"

    def done_under(self, folder: str) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM files WHERE state = 'done' AND path LIKE ?", (folder + "/%",)
        ).fetchone()[0]

    def report_has(self, name: str, seen: list[int]) -> bool:
        """Whether the report on disk lists `name` (read again only when the file changed)."""
        try:
            mtime = self.out.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == seen[0]:
            return False
        seen[0] = mtime
        try:
            wb = openpyxl.load_workbook(self.out, read_only=True)
        except Exception:  # noqa: BLE001 - replaced while we opened it: look again
            seen[0] = 0
            return False
        found = any(r[0] == name for r in wb["Images"].iter_rows(min_row=2, max_col=1, values_only=True))
        wb.close()
        return found

    def device(self) -> str:
        """The numerics the daemon's network really runs at (its 'ready' log line)."""
        line = next(s for s in log_file(self.state).read_text().splitlines() if " INFO ready (" in s)
        return line.split(" INFO ready (", 1)[1][:-1]

    def stop(self) -> float:
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(60)
        took = time.perf_counter() - started
        self.db.close()
        self.console.close()
        if rc != 0:
            raise SystemExit(f"the daemon exited with {rc}")
        return took


def latencies(daemon: Daemon, images: list[Path], tag: str) -> dict[str, float]:
    """p50/p95 of close -> ledger row and close -> report, one image at a time."""
    to_row, to_report = [], []
    for i, src in enumerate(images):
        data = src.read_bytes()
        name = f"drops/{tag}-{i:03d}.jpg"
        seen = [0]
        with open(daemon.root / name, "wb") as fh:
            fh.write(data)
        closed = time.perf_counter()
        while not daemon.done(name):
            time.sleep(0.002)
        to_row.append(time.perf_counter() - closed)
        while not daemon.report_has(name, seen):
            time.sleep(0.01)
        to_report.append(time.perf_counter() - closed)
        print(f"{tag} {i + 1}: row {to_row[-1]:.3f} s, report {to_report[-1]:.3f} s", flush=True)
        time.sleep(0.5)  # let the debounced report settle: each drop stands alone
    return {"row50": percentile(to_row, 50), "row95": percentile(to_row, 95),
            "rep50": percentile(to_report, 50), "rep95": percentile(to_report, 95)}


def burst_rate(daemon: Daemon, images: list[Path], tag: str) -> float:
    started = time.perf_counter()
    place(images, daemon.root / tag)
    while daemon.done_under(tag) < len(images):
        time.sleep(0.01)
    return len(images) / (time.perf_counter() - started)


def engine_rate(classifier: Classifier, folder: Path) -> float:
    paths = sorted(folder.rglob("*.jpg"))
    started = time.perf_counter()
    for _ in classifier.predict_paths(paths, folder):
        pass
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drops", type=int, default=30, help="images dropped one at a time for the latency")
    ap.add_argument("--burst", type=int, default=500, help="images per burst")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", type=Path, default=REPO / "resources" / "models" / "default")
    ap.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()

    pool = real_images()
    need = args.drops + args.burst * (args.repeats + 1)
    if len(pool) < need:
        raise SystemExit(f"need {need} distinct images, the data set has {len(pool)}")
    drops, rest = pool[: args.drops], pool[args.drops :]
    bursts = [rest[i * args.burst : (i + 1) * args.burst] for i in range(args.repeats + 1)]
    load = [os.getloadavg()[0]]
    work = Path(tempfile.mkdtemp(prefix="bcc-bench-watch-"))
    # One per-user data directory for the engine here, the daemon and classify: the int8 package
    # the engine builds in its untimed warm-up is the one they load, as on a lab's computer.
    os.environ["XDG_DATA_HOME"] = str(work / "data")
    try:
        bundle = load_bundle(args.model)
        engine = Classifier([bundle])  # classify's own settings: compiles for runs this size
        warm = work / "warm"
        place(bursts[-1][:256], warm)
        engine_rate(engine, warm)  # compile once, untimed (the daemon loaded its model untimed too)
        daemon = Daemon(work, args.model)
        latency = latencies(daemon, drops, "drop")
        rates: dict[str, list[float]] = {"watch": [], "classify": [], "engine": []}
        for r in range(args.repeats):
            rates["watch"].append(burst_rate(daemon, bursts[r], f"burst-{r}"))
            folder = work / f"classify-{r}"
            place(bursts[r], folder)
            rates["classify"].append(
                e2e_rate(args.model, folder, len(bursts[r]), work / f"classify-{r}.xlsx", work / "data"))
            rates["engine"].append(engine_rate(engine, folder))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()), flush=True)
        device = daemon.device()
        shutdown = daemon.stop()
        load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [
        f"### `bcc watch` on CPU, {time.strftime('%Y-%m-%d')}",
        "",
        (f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
         f"model: {bundle.meta.arch} at {bundle.meta.input.size} px ({bundle.name}); daemon with its defaults "
         f"(native observer, settle 2 s, report debounce 1 s, network compiled at start: {device}); 1-minute load average "
         f"{load[0]:.1f} at the start and {load[-1]:.1f} at the end (a shared machine: other work was running)."),
        "",
        "| measure | figure | target |",
        "|---|---:|---|",
        (f"| image closed in ROOT -> its ledger row, p50 / p95 ({args.drops} single images) "
         f"| {latency['row50']:.2f} / **{latency['row95']:.2f} s** | p95 < 1 s |"),
        (f"| image closed in ROOT -> in the Excel report, p50 / p95 "
         f"| {latency['rep50']:.2f} / **{latency['rep95']:.2f} s** | < 3 s |"),
        f"| burst of {args.burst} copied in -> all rows committed (median of {args.repeats}) | **{med['watch']:.1f} img/s** | |",
        (f"| `bcc classify` on the same images (new process, defaults, report written) | {med['classify']:.1f} img/s "
         f"| watch >= 0.90 of this: **{med['watch'] / med['classify']:.2f}** |"),
        (f"| classify's engine, model loaded and compiled (no start-up, no report) | {med['engine']:.1f} img/s "
         f"| watch is {med['watch'] / med['engine']:.2f} of this |"),
        f"| SIGINT -> daemon exited (report written) | {shutdown:.2f} s | a few s |",
        "",
    ]
    publish("\n".join(lines), args.write, "## `bcc watch`")

if __name__ == "__main__":
    main()
