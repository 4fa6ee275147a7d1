"""Benchmark the desktop app: its rate against `bcc classify`, UI-thread stalls, and memory.

    python bench/bench_gui.py [--stall-images N] [--memory-images N] [--rounds R] [--model BUNDLE] [--write]

Each measurement runs in a fresh process (offscreen Qt, the real window, the shipped model by
default); the app classifies in its classifier process, as a user's would:
  * rate and stalls: N real images (default 400) in S slide folders (default 1).  `bcc classify`
            first builds the int8 package once in a private per-user data directory (as on a lab
            computer); then R rounds alternate the app and `bcc classify` on the same folder,
            both loading that kept package.  The app's time runs from launching its process to
            its last row, the folder opened as soon as the window is shown (the classifier
            process starts with the window and loads the model meanwhile); `bcc classify`'s is its whole
            process, start-up and report included.  Medians and their ratio; target: the app at
            >= 0.9 of `bcc classify` (issue #38: 400 images in one folder).
            Meanwhile a QTimer ticks every 50 ms on the UI thread (table sorted flagged-first,
            scrolled to the newest row after every batch, a new row selected every second as a
            reviewer would); the longest gap minus the 50 ms is the longest stall.  Target
            < 250 ms on the 2-core CPU.
  * memory: a folder of N images (real images hard-linked into 50 slide folders) classified in
            the window with a fresh data directory (the int8 package built in the run: the worst
            case); resident memory of the app and of its classifier process sampled every 0.5 s,
            the peaks (VmHWM) reported, then the whole table scrolled through (thumbnails) and
            the report exported.  Target: both processes together < 1.5 GB.
Figures go to stdout and, with --write, into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from common import ALL4, REPO, cpu_name, publish

sys.path.insert(0, str(REPO / "tests"))
from folders import spread_images

DEFAULT_MODEL = REPO / "resources" / "models" / "default"
TICK_MS = 50


def proc_status(key: str, pid: int | str = "self") -> int:
    """A VmRSS/VmHWM-style field of /proc/PID/status, in bytes (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a process has used so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the classifier process, and the int8 build it starts once)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def real_images() -> list[Path]:
    """All real images, interleaved by class so any prefix has every class."""
    per_class = [sorted(d.glob("*.jpg")) for d in sorted(ALL4.iterdir()) if d.is_dir()]
    out = []
    for i in range(max(map(len, per_class))):
        out += [files[i] for files in per_class if i < len(files)]
    return out


def make_folder(dest: Path, n: int, slides: int) -> Path:
    """n real images (repeated when n exceeds the data set) spread over `slides` folders."""
    return spread_images(dest, real_images(), n, lambda k: f"slide-{k % slides + 1:02d}")


def _window(model: Path, tmp: Path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(["bench_gui"])
    from bcc_desk.gui import MainWindow

    window = MainWindow(model_dirs=[model], settings=QSettings(str(tmp / "s.ini"), QSettings.Format.IniFormat),
                        ask_before_close=False)
    window.resize(1400, 900)
    window.show()
    return app, window


def _wait(app, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.005)


def part_stall(model: Path, folder: Path, tmp: Path) -> dict:
    import gc

    from PySide6.QtCore import QEventLoop, QTimer

    launched = float(os.environ.get("BENCH_LAUNCHED", time.time()))
    app, window = _window(model, tmp)
    shown_s = time.time() - launched  # process start, imports, the window built and shown
    ticks: list[float] = []
    cpu: list[float] = []  # the UI thread's own CPU time at each tick

    def tick() -> None:
        ticks.append(time.perf_counter())
        cpu.append(time.thread_time())

    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(tick)
    timer.start()
    # Where a long gap comes from: the UI thread's own work, a garbage-collector pass (which
    # stops every thread), or neither (waiting for the GIL or for a CPU on a busy machine).
    gc_pauses: list[float] = []
    gc_start: list[float] = [0.0]

    def on_gc(phase: str, _info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_start[0])

    gc.callbacks.append(on_gc)
    load_before = os.getloadavg()[0]
    first_row: list[float] = []

    def on_rows(_n: int) -> None:
        if not first_row:
            first_row.append(time.perf_counter())
        window.table.scrollToBottom()

    def review_next() -> None:  # a reviewer clicking through rows while they arrive
        rows = window.proxy.rowCount()
        if rows:
            window.table.selectRow(int(time.perf_counter() * 7) % rows)

    reviewer = QTimer()
    reviewer.setInterval(1000)
    reviewer.timeout.connect(review_next)
    window.rows_added.connect(on_rows)
    window.flagged_first()
    loop = QEventLoop()
    window.classification_finished.connect(lambda _ok: loop.quit())
    ticks.clear()
    cpu.clear()
    started = time.perf_counter()
    process_cpu = time.process_time()
    window.open_folder(folder)
    reviewer.start()
    loop.exec()
    finished = time.perf_counter()
    process_cpu = time.process_time() - process_cpu
    child_cpu = cpu_seconds(window.desk.engine.pid)
    run_ticks = ticks[:]
    _wait(app, 3.0)  # after the run: the timer's own jitter, with nothing to do
    idle = ticks[len(run_ticks):]
    ticks[:] = run_ticks
    timer.stop()
    reviewer.stop()
    gc.callbacks.remove(on_gc)
    load_after = os.getloadavg()[0]
    rows = window.model.rowCount()
    window.close()

    def gaps(ts: list[float]) -> list[float]:
        return [b - a for a, b in itertools.pairwise(ts)]

    all_gaps = gaps([started, *ticks])
    worst = max(range(1, len(ticks)), key=lambda i: ticks[i] - ticks[i - 1])
    during_rows = gaps([t for t in ticks if first_row and t >= first_row[0]])
    return {
        "images": rows,
        "seconds": finished - started,
        "rate_e2e": rows / (finished - started),
        "shown_s": shown_s,
        "app_s": shown_s + finished - started,
        "rate_window": rows / (shown_s + finished - started),
        "app_cpu_s": process_cpu,
        "classifier_cpu_s": child_cpu,
        "images_per_s": rows / (finished - first_row[0]) if first_row else 0.0,
        "first_row_s": (first_row[0] - started) if first_row else None,
        "idle_max_gap_ms": 1000 * max(gaps(idle), default=0.0),
        "max_gap_ms": 1000 * max(all_gaps),
        "max_gap_rows_ms": 1000 * max(during_rows) if during_rows else None,
        "p99_gap_ms": 1000 * statistics.quantiles(all_gaps, n=100)[98],
        "median_gap_ms": 1000 * statistics.median(all_gaps),
        "ui_cpu_in_longest_gap_ms": 1000 * (cpu[worst] - cpu[worst - 1]),
        "ui_cpu_max_per_gap_ms": 1000 * max(gaps(cpu)),
        "gc_max_pause_ms": 1000 * max(gc_pauses, default=0.0),
        "load_before": load_before,
        "load_after": load_after,
        "device": window.status_area.device_label.text(),
    }


def part_memory(model: Path, n: int, tmp: Path) -> dict:
    from PySide6.QtCore import QEventLoop, QTimer

    t = time.perf_counter()
    folder = make_folder(tmp / "folder", n, slides=50)
    build_s = time.perf_counter() - t
    app, window = _window(model, tmp)
    rss_start = proc_status("VmRSS")
    samples: list[int] = []
    child: dict[str, int] = {}  # the classifier process: pid, its peak so far

    def sample() -> None:
        samples.append(proc_status("VmRSS"))
        pid = window.desk.engine.pid
        if pid is not None:
            child["pid"] = pid
            child["hwm"] = max(child.get("hwm", 0), proc_status("VmHWM", pid))
            child["rss_sum"] = max(child.get("rss_sum", 0), samples[-1] + proc_status("VmRSS", pid))
        tree = samples[-1] + sum(proc_status("VmRSS", p) for p in descendants(os.getpid()))
        child["tree"] = max(child.get("tree", 0), tree)

    sampler = QTimer()
    sampler.setInterval(500)
    sampler.timeout.connect(sample)
    sampler.start()
    loop = QEventLoop()
    window.classification_finished.connect(lambda _ok: loop.quit())
    window.rows_added.connect(lambda _n: window.table.scrollToBottom())
    started = time.perf_counter()
    window.open_folder(folder)
    loop.exec()
    classify_s = time.perf_counter() - started
    rows = window.model.rowCount()
    rss_after_run = proc_status("VmRSS")
    # A user scrolling through every row: thumbnails decoded for each screenful.
    bar = window.table.verticalScrollBar()
    for value in range(0, bar.maximum() + bar.pageStep(), bar.pageStep()):
        bar.setValue(value)
        _wait(app, 0.05)
    window.thumbnails.wait()
    _wait(app, 0.5)
    rss_after_scroll = proc_status("VmRSS")
    out = window.export_report(tmp / "report.xlsx")
    rss_after_export = proc_status("VmRSS")
    sample()
    sampler.stop()
    window.close()
    return {
        "images": rows,
        "folder_build_s": build_s,
        "classify_s": classify_s,
        "rss_start_mb": rss_start / 2**20,
        "rss_after_run_mb": rss_after_run / 2**20,
        "rss_after_scroll_mb": rss_after_scroll / 2**20,
        "rss_after_export_mb": rss_after_export / 2**20,
        "rss_peak_sampled_mb": max(samples) / 2**20 if samples else 0.0,
        "vmhwm_mb": proc_status("VmHWM") / 2**20,
        "child_vmhwm_mb": child.get("hwm", 0) / 2**20,
        "sum_rss_peak_mb": child.get("rss_sum", 0) / 2**20,
        "tree_rss_peak_mb": child.get("tree", 0) / 2**20,
        "report_bytes": out.stat().st_size,
        "thumbnails_cached": len(window.thumbnails),
        "device": window.status_area.device_label.text(),
    }


def run_part(part: str, model: Path, arg: str, data_home: Path) -> dict:
    """One part in a fresh process, with `data_home` as its per-user data directory (where the
    int8 package is kept)."""
    with tempfile.TemporaryDirectory(prefix="bench-gui-") as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, "--part", part, "--arg", arg, "--model", str(model),
                        "--result", str(result)], check=True,
                       env={**os.environ, "XDG_DATA_HOME": str(data_home), "BENCH_LAUNCHED": repr(time.time())})
        return json.loads(result.read_text())


def rate_and_stalls(model: Path, n: int, slides: int, rounds: int) -> dict:
    """The app and `bcc classify` alternated on one folder, the int8 package kept (see above)."""
    from bench_classify import e2e_rate  # torch: kept out of the app's measured process
    with tempfile.TemporaryDirectory(prefix="bench-gui-rate-") as tmp:
        work = Path(tmp)
        folder = make_folder(work / "folder", n, slides=slides)
        data = work / "data"
        first_cli = e2e_rate(model, folder, n, work / "first.xlsx", data)  # builds the int8 package
        apps, clis = [], []
        for _ in range(rounds):
            apps.append(run_part("stall", model, str(folder), data))
            clis.append(e2e_rate(model, folder, n, work / "cli.xlsx", data))
    app_rate = statistics.median(a["rate_window"] for a in apps)
    cli_rate = statistics.median(clis)
    worst = max(apps, key=lambda a: a["max_gap_ms"])
    return {**worst, "rounds": rounds, "slides": slides, "app_rates": [a["rate_window"] for a in apps], "cli_rates": clis,
            "app_seconds": [a["app_s"] for a in apps], "shown_seconds": [a["shown_s"] for a in apps],
            "app_rate": app_rate, "cli_rate": cli_rate, "ratio": app_rate / cli_rate, "first_cli": first_cli,
            "max_gaps_ms": [a["max_gap_ms"] for a in apps]}


def markdown(stall: dict | None, memory: dict | None, model: Path) -> str:
    import torch

    load = os.getloadavg()[0]
    lines = [
        f"### Desktop app (`bcc-desk`), {date.today().isoformat()}",
        "",
        (f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Qt offscreen; model: {model.name} "
        f"({'shipped' if model.resolve() == DEFAULT_MODEL.resolve() else 'given'}); "
        f"load average {load:.1f} at the end (the machine is shared). Fresh processes; the app classifies "
        "in its classifier process."),
        "",
    ]
    if stall:
        rates = ", ".join(f"{a:.1f} / {c:.1f}" for a, c in zip(stall["app_rates"], stall["cli_rates"], strict=True))
        lines += [
            (f"**Rate against `bcc classify`** on the same {stall['images']} real images in {stall['slides']} slide "
            "folder(s), "
            f"int8 package kept (built by a first `bcc classify`: {stall['first_cli']:.1f} images/s end to end), "
            f"{stall['rounds']} rounds alternated (app / CLI, images/s: {rates}):"),
            "",
            "| measure | images/s |",
            "|---|---:|",
            f"| `bcc classify`, whole process (start-up, model load, report), median | {stall['cli_rate']:.1f} |",
            (f"| app, launching it to its last row (the window shown after {statistics.median(stall['shown_seconds']):.1f} s, "
             f"the folder opened then), median | {stall['app_rate']:.1f} |"),
            f"| **app / `bcc classify`** | **{stall['ratio']:.2f}** |",
            "",
            f"Target >= 0.90: {'**met**' if stall['ratio'] >= 0.9 else '**not met**'}.",
            "",
            (f"**UI-thread stalls** in the app round with the longest gap (device "
            f"{stall['device'].removeprefix('device: ')}; table sorted flagged-first, scrolled to the newest row "
            "after every batch, a new row selected every second); a 50 ms QTimer on the UI thread. Longest gap "
            f"of each round: {', '.join(f'{g:.0f}' for g in stall['max_gaps_ms'])} ms."),
            "",
            "| measure | value |",
            "|---|---:|",
            f"| longest gap between ticks, whole run (process start, model load, classification) | **{stall['max_gap_ms']:.0f} ms** |",
            f"| longest gap once rows arrive | {stall['max_gap_rows_ms']:.0f} ms |",
            f"| 99th percentile gap / median gap | {stall['p99_gap_ms']:.0f} ms / {stall['median_gap_ms']:.0f} ms |",
            f"| longest gap idle, after the run (timer jitter) | {stall['idle_max_gap_ms']:.0f} ms |",
            f"| UI thread's own CPU time within the longest gap | {stall['ui_cpu_in_longest_gap_ms']:.0f} ms |",
            f"| most UI-thread CPU time between two ticks, whole run | {stall['ui_cpu_max_per_gap_ms']:.0f} ms |",
            f"| longest garbage-collector pause in the app | {stall['gc_max_pause_ms']:.0f} ms |",
            f"| load average before / after (2 cores, shared) | {stall['load_before']:.1f} / {stall['load_after']:.1f} |",
            f"| time to the first row (process start, model load, first batch) | {stall['first_row_s']:.1f} s |",
            f"| classification rate in the window, after the first row | {stall['images_per_s']:.1f} images/s |",
            "",
            (f"Target: longest stall (gap minus the 50 ms interval) under 250 ms: "
            f"{'**met**' if stall['max_gap_ms'] - TICK_MS < 250 else '**not met**'} "
            f"({stall['max_gap_ms'] - TICK_MS:.0f} ms)."),
            "",
        ]
    if memory:
        both = memory["vmhwm_mb"] + memory["child_vmhwm_mb"]
        lines += [
            (f"**Memory** with a {memory['images']}-image folder (real images hard-linked into 50 slide folders; "
            "a fresh data directory, so the classifier process builds the int8 package in the run):"),
            "",
            "| point | resident memory |",
            "|---|---:|",
            f"| app: window open, no folder yet | {memory['rss_start_mb']:.0f} MB |",
            f"| app: all {memory['images']} classified ({memory['classify_s']:.0f} s) | {memory['rss_after_run_mb']:.0f} MB |",
            f"| app: after scrolling the whole table ({memory['thumbnails_cached']} thumbnails cached) "
            f"| {memory['rss_after_scroll_mb']:.0f} MB |",
            f"| app: after exporting the report ({memory['report_bytes'] / 1e6:.1f} MB xlsx) | {memory['rss_after_export_mb']:.0f} MB |",
            f"| app: peak (VmHWM) | {memory['vmhwm_mb']:.0f} MB |",
            f"| classifier process: peak (VmHWM) | {memory['child_vmhwm_mb']:.0f} MB |",
            f"| both at once, highest sampled sum | {memory['sum_rss_peak_mb']:.0f} MB |",
            (f"| every process of the app at once (with the one-off int8 build's), highest sampled sum "
             f"| {memory['tree_rss_peak_mb']:.0f} MB |"),
            f"| **both peaks added (an upper bound)** | **{both:.0f} MB** |",
            "",
            (f"Target under 1.5 GB (1536 MB) for both together: {'**met**' if both < 1536 else '**not met**'}; "
             f"every process at once: {'**met**' if memory['tree_rss_peak_mb'] < 1536 else '**not met**'}."),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stall-images", type=int, default=400)
    ap.add_argument("--stall-slides", type=int, default=1)
    ap.add_argument("--memory-images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--skip-stall", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    ap.add_argument("--part", choices=["stall", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--arg", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        with tempfile.TemporaryDirectory(prefix="bench-gui-part-") as tmp:
            if args.part == "stall":
                result = part_stall(args.model, Path(args.arg), Path(tmp))
            else:
                result = part_memory(args.model, int(args.arg), Path(tmp))
        args.result.write_text(json.dumps(result))
        print(args.part, json.dumps(result, indent=1), flush=True)
        os._exit(0)  # skip Qt/torch teardown: the figures are written
    stall = None if args.skip_stall else rate_and_stalls(args.model, args.stall_images, args.stall_slides, args.rounds)
    memory = None
    if not args.skip_memory:
        with tempfile.TemporaryDirectory(prefix="bench-gui-data-") as data:
            memory = run_part("memory", args.model, str(args.memory_images), Path(data))
    text = markdown(stall, memory, args.model)
    publish(text, args.write, "## Desktop app")


if __name__ == "__main__":
    main()
