"""One-shot GPU session: test, fit, evaluate and time bcc-desk on a lent CUDA machine in one command.

A GPU machine is lent for a few minutes, with no network, a copy of this working tree (64 MiB at
most, the carried folders included) and an empty folder `$OUT` whose files come back (each at most
16 MiB, at most 8 of them, 64 MiB in all).  So the work is split in three steps:

    python tools/gpu/gpu.py pack [--split RUN/split.csv] [--wheels]     # here: data into .gpu/
    python3 tools/gpu/gpu.py run [--epochs N]                           # there: everything, into $OUT
    python tools/gpu/gpu.py join FILES_AT [--dest runs/gpu]             # here: parts -> a bundle

`pack` copies the train and validation images of a split (default: the split `bcc-train fit`
makes of ../shared/data/all4 with seed 0; or `--split RUN/split.csv` of an earlier run) into
`.gpu/data/<class>/`, with `.gpu/split.csv` (the same split without its test rows: the test
images never travel, and `Split.load` wants every listed image present), `.gpu/split-full.csv`
(the whole split, for the test evaluation back here), `.gpu/ood/` (../shared/data/ood-dev) and
`.gpu/pack.json`.  With `--wheels` it also downloads into `.whl/` the wheels the GPU machine
lacks (imagehash, PyWavelets, openpyxl, platformdirs, pytest; see `WHEELS_NEEDED`).  Both
folders are git-ignored, so they travel only when carried.  It prints how big the tree that
travels will be.

`run` (the default command) installs `.whl/*.whl` into /tmp/site when there is a `.whl/`, puts
/tmp/site and the repository on PYTHONPATH, and then, each step a subprocess whose failure is
recorded while the rest goes on where it can:

1. the CUDA tests (tests/test_classifier.py and tests/test_cli.py: with a GPU present their
   `device="auto"` runs on CUDA, and the device-choice tests take their CUDA branch);
2. `python3 -m trainer fit .gpu/data --recipe gpu --split .gpu/split.csv --ood-dir .gpu/ood
   --device cuda --no-int8` (int8 is a CPU speed-up: add it back here with `bcc-train int8`).
   The fit gets the time the budget (`--budget`, 560 s) leaves after the tests and a reserve for
   the later steps; if it runs out, the fit is interrupted (its last.pt is per epoch) and re-run
   with `--epochs K` (K epochs done) so the best weights so far are still calibrated and exported;
3. `python3 -m trainer evaluate RUN/bundle .gpu/data --split .gpu/split.csv --part val`: the
   validation part only, the test split is never read there;
4. `python3 -m bcc_desk classify .gpu/data --model RUN/bundle --device cuda --csv`, timed (end to
   end, and steady from the report's per-image timestamps), with 2 decoding threads (the default)
   and with 8;
5. into $OUT: `model.safetensors.part00`, ... (15 MiB each), `manifest.json` (each part's sha256
   and the whole file's), `bundle.json`, `results.tar.gz` (history.csv, metrics, the evaluation,
   the classify reports, every step's log) and `figures.md` (each step's outcome and the figures),
   which is also printed at the end.

Time: the device command may run 600 s and the whole lend is 15 minutes, start-up included, so
`--budget` (560 s) bounds every step together.  The tests get at most `--tests-timeout` (150 s;
0 skips them), the fit what is left but `--reserve` (150 s), after compiling (about a minute) and
decoding the images.  The gpu recipe's 200 epochs may well not fit: pass `--epochs N`, and read the
seconds per epoch in figures.md before the next lend.  `--fit-args` passes more `bcc-train fit`
options as one string (issue #35's next GPU run: `--fit-args="--channels hue-sat-free --colour 0.5
--jpeg 0.25 --zoom 0.8,1.25"`, recipe.md run 23).  A fit cut short is exported all the same,
but with its learning-rate schedule unfinished (the salvage step says so).

`run --dry-run` does all of it on a CPU with tiny settings (convnext_atto at 64 px, one epoch, 4
training images per class, 3 MiB parts, no time budget to speak of), for tests/test_gpu_script.py:
about a minute of CPU time.

`join` verifies every part's sha256 and the whole file's against the manifest and bundle.json,
writes DEST/bundle/ (model.safetensors + bundle.json), unpacks results.tar.gz and figures.md into
DEST, and checks the bundle with `bcc_desk.bundle.load_bundle`; a missing or corrupt part is a
one-line error (exit 1).

How a session with a GPU uses it:

    python tools/gpu/gpu.py pack --wheels
    mv resources/models/default /tmp/bcc-default-model   # ~64 MB: the tree would be over 64 MiB
    # device call, carrying [".gpu", ".whl"]:  python3 tools/gpu/gpu.py run
    mv /tmp/bcc-default-model resources/models/default
    python tools/gpu/gpu.py join FILES_AT
    bcc-train evaluate runs/gpu/bundle ../shared/data/all4 --split .gpu/split-full.csv --part test

Two caveats of the packed data: the bundle's provenance records the train+val split's sha256
and the fingerprint of the train+val images (the full split's sha256 is in .gpu/pack.json and in
figures.md); and the device has no ../shared/data, so for the tests `run` links
../shared/data/all4 and ood-dev to the packed folders when it can (removed afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
PACK = REPO / ".gpu"
WHEELS = REPO / ".whl"
SITE = Path("/tmp/site")

MiB = 1 << 20
PART_SIZE = 15 * MiB
FILE_LIMIT = 16 * MiB
MAX_FILES = 8
OUT_LIMIT = 64 * MiB
TREE_LIMIT = 64 * MiB

WEIGHTS = "model.safetensors"
META = "bundle.json"
MANIFEST = "manifest.json"
FIGURES = "figures.md"
RESULTS = "results.tar.gz"

# Modules the steps import that a bare GPU machine may lack (the preinstalled ones are checked too).
MODULES = ["torch", "torchvision", "timm", "typer", "safetensors", "PIL", "numpy", "pandas", "rich", "sklearn",
           "matplotlib", "lxml", "imagehash", "pywt", "openpyxl", "platformdirs", "pytest"]
# What `pack --wheels` downloads for the GPU machine (Python 3.12, x86-64 Linux), dependencies named.
WHEELS_NEEDED = ["imagehash", "PyWavelets", "openpyxl", "et-xmlfile", "platformdirs",
                 "pytest", "pluggy", "iniconfig", "packaging", "pytest-timeout"]
GPU_TESTS = ["tests/test_classifier.py", "tests/test_cli.py"]
DRY_TESTS = ["tests/test_classifier.py"]
DRY_TESTS_K = "device_choice"
DRY_FIT = ["--arch", "convnext_atto", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
           "--hidden", "32", "--limit-per-class", "4"]
DRY_PART_SIZE = 3 * MiB  # convnext_atto's ~8 MB of weights: three parts, and still at most 8 files

log = logging.getLogger("bcc-gpu")


class JoinError(Exception):
    """A part is missing or does not match; the message is one line."""


# ------------------------------------------------------------------------------------------------
# pack


def load_or_make_split(data: Path, split: Path | None, seed: int) -> Any:
    """The split of `data`: read from `split`, or made as `bcc-train fit` makes it (seed `seed`)."""
    sys.path.insert(0, str(REPO))
    from trainer.split import Split, make_split

    if split is not None:
        return Split.load(split, data)
    log.info("no --split: splitting %s as bcc-train fit does (seed %d)", data, seed)
    return make_split(data, seed=seed)


def clear_pack(dest: Path) -> None:
    """Empty `dest` for a new pack; refuses a non-empty folder that is not an earlier pack."""
    if dest.exists() and any(dest.iterdir()) and not (dest / "pack.json").is_file():
        raise SystemExit(f"error: {dest} is not empty and holds no pack.json; choose another --dest")
    for name in ("data", "ood", "split.csv", "split-full.csv", "pack.json"):
        path = dest / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    dest.mkdir(parents=True, exist_ok=True)


def copy_images(src: Path, rel_paths: list[str], dest: Path) -> int:
    """Copy `rel_paths` (posix, relative to `src`) under `dest`, byte for byte; returns the bytes."""
    total = 0
    for rel in rel_paths:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
        total += target.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def tree_bytes() -> int:
    """Bytes of the working tree that travels without carry: tracked and untracked, not ignored."""
    try:
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    names = [n for n in listing.decode("utf-8", "replace").split("\0") if n]
    return sum((REPO / n).stat().st_size for n in names if (REPO / n).is_file())


def download_wheels(dest: Path) -> None:
    """Wheels for the GPU machine's Python 3.12 on x86-64 Linux, into `dest` (uses PyPI)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
           "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "any", "-d", str(dest), *WHEELS_NEEDED]
    subprocess.run(cmd, check=True)
    log.info("wheels in %s: %s", dest, ", ".join(sorted(p.name for p in dest.glob("*.whl"))))


def cmd_pack(args: argparse.Namespace) -> int:
    data, dest = args.data.resolve(), args.dest.resolve()
    if not data.is_dir():
        raise SystemExit(f"error: data folder not found: {data}")
    try:
        split = load_or_make_split(data, args.split, args.seed)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    args.ood = args.ood.resolve()
    clear_pack(dest)
    (dest / "split-full.csv").write_text(split.to_csv(), encoding="utf-8")
    kept = [r for r in split.rows if r.split in ("train", "val")]
    packed = type(split)(rows=kept, classes=split.classes, seed=split.seed)
    packed.save(dest / "split.csv")
    image_bytes = copy_images(data, [r.path for r in kept], dest / "data")
    ood_paths = sorted(p.relative_to(args.ood).as_posix() for p in args.ood.rglob("*") if p.is_file()) \
        if args.ood.is_dir() else []
    ood_bytes = copy_images(args.ood, ood_paths, dest / "ood")
    info = {
        "data": str(data), "split_source": str(args.split) if args.split else f"make_split(seed={args.seed})",
        "split_full_sha256": split.sha256(), "split_packed_sha256": packed.sha256(),
        "counts": split.counts(), "images": len(kept), "image_bytes": image_bytes,
        "ood_images": len(ood_paths), "ood_bytes": ood_bytes,
        "packed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (dest / "pack.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("packed %d train+val images (%.1f MiB) and %d OOD images into %s; test images left out: %d",
             len(kept), image_bytes / MiB, len(ood_paths), dest, len(split.rows) - len(kept))
    if args.wheels:
        download_wheels(WHEELS)
    report_travel_size(dest)
    return 0


def report_travel_size(dest: Path) -> None:
    tree, pack, wheels = tree_bytes(), folder_bytes(dest), folder_bytes(WHEELS)
    total = tree + pack + wheels
    log.info("the device call would carry %.1f MiB: tree %.1f + %s %.1f + .whl %.1f (limit %d MiB)",
             total / MiB, tree / MiB, dest.name, pack / MiB, wheels / MiB, TREE_LIMIT // MiB)
    if total > TREE_LIMIT:
        shipped = REPO / "resources" / "models" / "default"
        hint = f"; move {shipped} out of the tree for the call" if shipped.is_dir() else ""
        log.warning("that is over the %d MiB limit%s", TREE_LIMIT // MiB, hint)


# ------------------------------------------------------------------------------------------------
# run: steps as subprocesses, each with its outcome recorded


@dataclass
class Step:
    name: str
    outcome: str = "not run"
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok" or self.outcome.startswith(("ok (", "skipped"))


class Runner:
    """Runs the steps with a shared deadline; keeps their logs under WORK/logs."""

    def __init__(self, work: Path, env: dict[str, str], budget: float, grace: float, scale: float = 1.0) -> None:
        self.work, self.env, self.grace, self.scale = work, env, grace, scale
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget
        self.steps: list[Step] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def cap(self, seconds: float) -> float:
        """A step's time limit: `seconds` on the GPU machine, `scale` times that in a dry run
        (a CPU shared with other work can be very much slower)."""
        return seconds * self.scale

    def record(self, step: Step) -> Step:
        self.steps.append(step)
        log.info("step %s: %s (%.1f s)%s", step.name, step.outcome, step.seconds,
                 f" - {step.detail}" if step.detail else "")
        return step

    def skip(self, name: str, reason: str) -> Step:
        return self.record(Step(name, f"skipped ({reason})"))

    def call(self, name: str, argv: list[str], timeout: float, cwd: Path = REPO, also_ok: dict[int, str] | None = None) -> Step:
        """Run `argv`, output to WORK/logs/NAME.log; on timeout SIGINT, then SIGKILL its group.
        `also_ok`: exit codes other than 0 that mean the step did its work, with their outcome."""
        if timeout < 10:
            return self.skip(name, "no time left")
        path = self.logs / f"{name}.log"
        log.info("step %s (timeout %.0f s): %s", name, timeout, " ".join(argv))
        t0 = time.monotonic()
        with open(path, "w", encoding="utf-8") as fh:
            proc = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                outcome = "ok" if rc == 0 else (also_ok or {}).get(rc, f"failed (exit {rc})")
            except subprocess.TimeoutExpired:
                outcome = f"timed out after {timeout:.0f} s"
                stop_group(proc, self.grace)
        step = Step(name, outcome, time.monotonic() - t0, last_line(path))
        return self.record(step)


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """Interrupt the process group we started (as Ctrl+C would), then kill it after `grace` s."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(path: Path) -> str:
    """The last non-empty line of a log (a CLI's one-line error, pytest's summary), shortened."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def child_env(site: Path | None, work: Path) -> dict[str, str]:
    """The steps' environment: /tmp/site and the repository first on PYTHONPATH, no network."""
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update({
        "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", "COLUMNS": "160",
        "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "XDG_DATA_HOME": str(work / "xdg"),
    })
    return env


def install_wheels(runner: Runner, dry_run: bool) -> Path | None:
    """pip-install .whl/*.whl into /tmp/site (not in a dry run: they are for the GPU's Python)."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if dry_run:
        runner.skip("install", "dry run")
        return None
    if not wheels:
        runner.skip("install", "no .whl/")
        return None
    step = runner.call("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--target", str(SITE), *map(str, wheels)], timeout=runner.cap(120))
    return SITE if step.ok else None


ENV_PROBE = """
import importlib, json, platform, sys
mods = {MODULES!r}
out = {{"python": platform.python_version(), "missing": []}}
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:
        out["missing"].append(f"{{m}} ({{type(exc).__name__}})")
import torch
out["torch"] = torch.__version__
out["cuda"] = torch.version.cuda
out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if out["gpu"] else None
out["cpus"] = __import__("os").cpu_count()
print(json.dumps(out))
"""


def probe_environment(runner: Runner) -> dict[str, Any]:
    """Versions, the GPU and any missing module, as WORK/env.json."""
    step = runner.call("environment", [sys.executable, "-c", ENV_PROBE.format(MODULES=MODULES)], timeout=runner.cap(120))
    try:
        env = json.loads(last_line(runner.logs / "environment.log"))
    except ValueError:
        return {}
    (runner.work / "env.json").write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
    step.detail = f"{env.get('gpu') or 'no GPU'}, torch {env.get('torch')}" + (
        f"; missing: {', '.join(env['missing'])}" if env.get("missing") else "")
    return env


def link_test_data(pack: Path) -> list[Path]:
    """Where ../shared/data is absent (the GPU machine), link all4 and ood-dev to the pack.

    Returns what was created, for `unlink_test_data`; nothing when the data is there or the
    repository's parent is not writable (the tests that need it then fail, and say so)."""
    created: list[Path] = []
    try:
        for folder in (SHARED.parent.parent, SHARED.parent, SHARED):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        for name, target in (("all4", pack / "data"), ("ood-dev", pack / "ood")):
            link = SHARED / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(target, target_is_directory=True)
                created.append(link)
    except OSError as exc:
        log.warning("cannot link the test data under %s: %s", SHARED, exc)
    return created


def unlink_test_data(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.is_symlink():
                path.unlink()
            else:
                path.rmdir()


def run_tests(runner: Runner, args: argparse.Namespace) -> Step:
    if args.tests_timeout <= 0:
        return runner.skip("tests", "--tests-timeout 0")
    tests, k = (DRY_TESTS, DRY_TESTS_K) if args.dry_run else (GPU_TESTS, args.tests_k)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *(["-k", k] if k else [])]
    created = link_test_data(args.pack)
    try:
        return runner.call("tests", argv, timeout=min(runner.cap(args.tests_timeout), runner.remaining() - args.reserve))
    finally:
        unlink_test_data(created)


def fit_argv(args: argparse.Namespace, run: Path, epochs: int | None) -> list[str]:
    argv = [sys.executable, "-m", "trainer", "fit", str(args.data), "--out", str(run), "--recipe", args.recipe,
            "--split", str(args.split), "--ood-dir", str(args.ood), "--device", args.device,
            "--workers", str(args.workers), "--no-int8", "--cv", "0"]  # the GPU's minutes go to the one model
    if args.dry_run:
        argv += DRY_FIT
    argv += shlex.split(args.fit_args)  # e.g. the next recipe's `--channels hue-free --colour 1`
    if epochs is not None:
        argv += ["--epochs", str(epochs)]  # the last --epochs given wins
    return argv


def history_rows(run: Path) -> list[dict[str, str]]:
    try:
        with open(run / "history.csv", newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def fit(runner: Runner, args: argparse.Namespace, run: Path) -> bool:
    """Fit; on a timeout, export the best weights of the epochs done.  True when RUN/bundle exists."""
    step = runner.call("fit", fit_argv(args, run, args.epochs), timeout=runner.remaining() - args.reserve,
                       also_ok={4: "ok (the bundle is not validated)"})  # a bundle was written: its verdict is in it
    if step.outcome.startswith("timed out"):
        done = len(history_rows(run))
        if done and (run / "last.pt").is_file():
            step.detail = f"interrupted after {done} epochs; exporting those"
            runner.call("fit-salvage", fit_argv(args, run, done), timeout=min(runner.cap(180), runner.remaining() - 60))
        else:
            runner.skip("fit-salvage", "no epoch finished")
    return (run / "bundle" / WEIGHTS).is_file()


def evaluate(runner: Runner, args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    folder = runner.work / "eval-val"
    argv = [sys.executable, "-m", "trainer", "evaluate", str(bundle), str(args.data), "--split", str(args.split),
            "--part", "val", "--out", str(folder), "--device", args.device]
    step = runner.call("evaluate", argv, timeout=min(runner.cap(180), runner.remaining() - 40))
    metrics = read_json(folder / "metrics.json") if step.ok else {}
    if metrics:
        step.detail = f"val accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
    return metrics


def classify(runner: Runner, args: argparse.Namespace, bundle: Path) -> list[dict[str, Any]]:
    """Time `bcc classify` over the packed images, per number of decoding threads."""
    rows = []
    for workers in args.classify_workers:
        report = runner.work / f"classify-w{workers}.csv"
        argv = [sys.executable, "-m", "bcc_desk", "classify", str(args.data), "--model", str(bundle),
                "--device", args.device, "--out", str(report), "--csv", "--quiet", "--workers", str(workers),
                "--allow-unvalidated"]  # timed whatever its verdict: the verdict is reported with the fit
        step = runner.call(f"classify-w{workers}", argv, timeout=min(runner.cap(150), runner.remaining() - 20))
        if not step.ok or step.outcome.startswith("skipped"):
            continue
        n, steady = report_rate(report)
        rows.append({"workers": workers, "images": n, "seconds": step.seconds,
                     "images_per_s": n / step.seconds if step.seconds else None, "steady_images_per_s": steady})
        step.detail = f"{n} images, {n / step.seconds:.1f} images/s end to end" + (
            f", {steady:.1f} steady" if steady else "")
    return rows


def report_rate(report: Path) -> tuple[int, float | None]:
    """Images in a `bcc classify --csv` report and the rate between its first and last timestamps
    (1 s resolution: only for spans of a few seconds or more)."""
    with open(report, newline="", encoding="utf-8-sig") as fh:
        stamps = [row["classified_at"] for row in csv.DictReader(fh)]
    times = sorted(datetime.fromisoformat(s) for s in stamps if s)
    span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0.0
    return len(stamps), ((len(times) - 1) / span if span >= 3 else None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_file(path: Path, out: Path, part_size: int) -> dict[str, Any]:
    """Write `path` as OUT/NAME.part00, ... of at most `part_size` bytes; returns the manifest."""
    parts, whole = [], hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(part_size):
            name = f"{path.name}.part{len(parts):02d}"
            (out / name).write_bytes(chunk)
            whole.update(chunk)
            parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": whole.hexdigest(), "part_size": part_size,
            "parts": parts}


def export(runner: Runner, bundle: Path, out: Path, part_size: int) -> dict[str, Any]:
    """The bundle into OUT: weight parts, manifest.json and bundle.json."""
    t0 = time.monotonic()
    manifest = split_file(bundle / WEIGHTS, out, part_size)
    meta = read_json(bundle / META)
    manifest["bundle_weights_sha256"] = meta.get("weights_sha256")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    shutil.copy2(bundle / META, out / META)
    left = sorted(p.name for p in bundle.iterdir() if p.name not in (WEIGHTS, META))
    match = manifest["sha256"] == manifest["bundle_weights_sha256"]
    detail = f"{len(manifest['parts'])} parts of {manifest['bytes'] / MiB:.1f} MiB" + (
        f"; not shipped: {', '.join(left)}" if left else "")
    runner.record(Step("export", "ok" if match else "failed (weights do not match bundle.json)",
                       time.monotonic() - t0, detail))
    return manifest


def pack_results(runner: Runner, run: Path, out: Path, files: list[Path]) -> None:
    """The small files into OUT/results.tar.gz (history, metrics, evaluation, reports, logs)."""
    t0 = time.monotonic()
    (runner.work / "steps.json").write_text(json.dumps([asdict(s) for s in runner.steps], indent=2) + "\n")
    with tarfile.open(out / RESULTS, "w:gz") as tar:
        for path in files:
            if path.exists():
                tar.add(path, arcname=path.name)
    size = (out / RESULTS).stat().st_size
    ok = size <= FILE_LIMIT
    runner.record(Step("results", "ok" if ok else f"failed ({size / MiB:.1f} MiB, over the limit)",
                       time.monotonic() - t0, f"{RESULTS}, {size / 1024:.0f} KiB"))


def check_outputs(runner: Runner, out: Path, planned: int) -> list[tuple[str, int]]:
    """Every file of OUT within the limits, counting `planned` small files still to be written."""
    files = sorted((p.relative_to(out).as_posix(), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    problems = []
    if len(files) + planned > MAX_FILES:
        problems.append(f"{len(files) + planned} files, over {MAX_FILES}")
    problems += [f"{name} is {size / MiB:.1f} MiB" for name, size in files if size > FILE_LIMIT]
    total = sum(size for _, size in files)
    if total > OUT_LIMIT:
        problems.append(f"{total / MiB:.1f} MiB in all")
    runner.record(Step("outputs", "ok" if not problems else f"failed ({'; '.join(problems)})", 0.0,
                       f"{len(files) + planned} files, {total / MiB:.1f} MiB"))
    return files


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# -- figures.md ----------------------------------------------------------------------------------


def figures(steps: list[Step], env: dict[str, Any], history: list[dict[str, str]], metrics: dict[str, Any],
            rates: list[dict[str, Any]], manifest: dict[str, Any], pack: dict[str, Any],
            outputs: list[tuple[str, int]], dry_run: bool) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# bcc-desk on a GPU{' (dry run)' if dry_run else ''}: {when}", "",
             f"Machine: {env.get('gpu') or 'no GPU'} ({env.get('gpu_memory_gib') or '-'} GiB), "
             f"{env.get('cpus', '?')} CPUs, Python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
             f"CUDA {env.get('cuda') or '-'}" + (f"; missing: {', '.join(env['missing'])}" if env.get("missing") else ""),
             "", "| step | outcome | seconds | notes |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.outcome} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |" for s in steps]
    lines += fit_figures(history) + eval_figures(metrics) + classify_figures(rates)
    lines += ["", "## Bundle", ""]
    if manifest:
        lines += [f"- weights sha256 `{manifest['sha256']}` ({manifest['bytes']:,} bytes, "
                  f"{len(manifest['parts'])} parts); bundle.json says `{manifest.get('bundle_weights_sha256')}`"]
    else:
        lines += ["- no bundle"]
    if pack:
        lines += [f"- split: the full split's sha256 `{pack.get('split_full_sha256')}`; the bundle's provenance "
                  f"records the packed (train+val) split `{pack.get('split_packed_sha256')}`"]
    lines += ["", "## Outputs", ""] + [f"- {name}: {size:,} bytes" for name, size in outputs] + [f"- {FIGURES}"]
    return "\n".join(lines) + "\n"


def fit_figures(history: list[dict[str, str]]) -> list[str]:
    if not history:
        return ["", "## Fit", "", "- no epoch finished"]
    f1 = [float(r["val_macro_f1"]) for r in history]
    best = max(range(len(f1)), key=f1.__getitem__)
    secs = [float(r["seconds"]) for r in history]
    rate = [float(r["train_images_per_s"]) for r in history]
    last = history[-1]
    return ["", "## Fit", "",
            f"- {len(history)} epochs, {sum(secs):.0f} s in epochs (median {statistics.median(secs):.2f} s an epoch, "
            f"first {secs[0]:.1f} s); median {statistics.median(rate):.0f} training images/s",
            f"- best validation macro-F1 {f1[best]:.4f} at epoch {best + 1}; last epoch: train loss "
            f"{float(last['train_loss']):.4f}, val accuracy {float(last['val_acc']):.4f}, val macro-F1 {f1[-1]:.4f}"]


def eval_figures(metrics: dict[str, Any]) -> list[str]:
    if not metrics:
        return ["", "## Validation", "", "- not evaluated"]
    per_class = ", ".join(f"{c} {v['f1']:.3f}" for c, v in metrics.get("per_class", {}).items())
    return ["", "## Validation (bcc-train evaluate --part val)", "",
            f"- {metrics['n']} images on {metrics.get('device')}: accuracy {metrics['accuracy']:.4f}, macro-F1 "
            f"{metrics['macro_f1']:.4f}, ECE {metrics.get('ece', float('nan')):.4f}, flagged {metrics.get('flagged', 0):.1%}",
            f"- F1 per class: {per_class}"]


def classify_figures(rates: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## bcc classify", ""]
    if not rates:
        return lines + ["- not timed"]
    lines += ["| decoding threads | images | seconds (end to end) | images/s end to end | images/s steady |",
              "|---:|---:|---:|---:|---:|"]
    for r in rates:
        steady = f"{r['steady_images_per_s']:.1f}" if r["steady_images_per_s"] else "-"
        lines.append(f"| {r['workers']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | {steady} |")
    return lines + ["", "End to end includes starting Python, loading the bundle and compiling; steady is from the "
                        "report's per-image timestamps (1 s resolution)."]


def cmd_run(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; run into an empty folder")
    work = (args.work or Path(tempfile.mkdtemp(prefix="bcc-gpu-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(work / "gpu.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    args.pack = args.pack.resolve()
    args.data, args.split, args.ood = (
        (p or default).resolve() for p, default in
        ((args.data, args.pack / "data"), (args.split, args.pack / "split.csv"), (args.ood, args.pack / "ood")))
    if args.dry_run:
        args.device = "cpu" if args.device == "cuda" else args.device
        args.part_size = args.part_size or DRY_PART_SIZE
        args.classify_workers = args.classify_workers or [2]
        args.workers = args.workers or 2
        args.budget = args.budget or 7200.0
    args.part_size = args.part_size or PART_SIZE
    args.classify_workers = args.classify_workers or [2, 8]
    args.workers = args.workers or min(16, os.cpu_count() or 4)
    args.budget = args.budget or 560.0
    run = work / "run"
    log.info("run: data %s, split %s, work %s, out %s%s", args.data, args.split, work, out,
             " (dry run)" if args.dry_run else "")

    runner = Runner(work, child_env(None, work), args.budget, args.grace, scale=10.0 if args.dry_run else 1.0)
    site = install_wheels(runner, args.dry_run)
    runner.env = child_env(site, work)
    env = probe_environment(runner)
    run_tests(runner, args)
    metrics: dict[str, Any] = {}
    rates: list[dict[str, Any]] = []
    manifest: dict[str, Any] = {}
    if fit(runner, args, run):
        metrics = evaluate(runner, args, run / "bundle")
        rates = classify(runner, args, run / "bundle")
        manifest = export(runner, run / "bundle", out, args.part_size)
    else:
        for name in ("evaluate", "classify", "export"):
            runner.skip(name, "no bundle")
    small = [work / "gpu.log", work / "steps.json", work / "env.json", args.pack / "pack.json",
             run / "history.csv", run / "metrics_val.json", run / "split.csv",
             *sorted((work / "eval-val").glob("*")), *sorted(work.glob("classify-w*.csv")), *sorted(runner.logs.glob("*.log"))]
    pack_results(runner, run, out, small)
    outputs = check_outputs(runner, out, planned=1)
    text = figures(runner.steps, env, history_rows(run), metrics, rates, manifest,
                   read_json(args.pack / "pack.json"), outputs, args.dry_run)
    (out / FIGURES).write_text(text, encoding="utf-8")
    print(text)
    return 0 if all(s.ok for s in runner.steps) else 1


# ------------------------------------------------------------------------------------------------
# join


def read_manifest(src: Path) -> dict[str, Any]:
    path = src / MANIFEST
    if not path.is_file():
        raise JoinError(f"{path} is missing: not the output of `gpu.py run`, or its fit failed")
    manifest = read_json(path)
    if not manifest.get("parts") or not manifest.get("sha256"):
        raise JoinError(f"{path} is not a parts manifest")
    return manifest


def join_parts(src: Path, manifest: dict[str, Any], target: Path) -> None:
    """Concatenate the parts into `target`, checking each part's sha256 and the whole file's."""
    whole = hashlib.sha256()
    with open(target, "wb") as fh:
        for part in manifest["parts"]:
            path = src / part["name"]
            if not path.is_file():
                raise JoinError(f"part {part['name']} is missing from {src} ({len(manifest['parts'])} parts expected)")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise JoinError(f"part {part['name']} does not match its sha256 in {MANIFEST} (corrupt or truncated)")
            whole.update(data)
            fh.write(data)
    if whole.hexdigest() != manifest["sha256"]:
        raise JoinError(f"the joined {manifest['file']} does not match the sha256 in {MANIFEST}")


def check_bundle(folder: Path) -> None:
    """`load_bundle` accepts the joined bundle (sha256 against bundle.json, shapes against the arch)."""
    sys.path.insert(0, str(REPO))
    from bcc_desk.bundle import BundleError, load_bundle

    try:
        load_bundle(folder)
    except BundleError as exc:
        raise JoinError(str(exc).splitlines()[0]) from None


def cmd_join(args: argparse.Namespace) -> int:
    src, dest = args.src.resolve(), args.dest.resolve()
    manifest = read_manifest(src)
    meta = read_json(src / META)
    if not meta:
        raise JoinError(f"{src / META} is missing or unreadable")
    if meta.get("weights_sha256") != manifest["sha256"]:
        raise JoinError(f"{META} records weights sha256 {str(meta.get('weights_sha256'))[:12]}..., the manifest "
                        f"{manifest['sha256'][:12]}...: they are from different runs")
    bundle = dest / "bundle"
    if bundle.exists() and not args.force:
        raise JoinError(f"{bundle} exists; remove it or pass --force")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".join-", dir=dest))
    try:
        join_parts(src, manifest, tmp / WEIGHTS)
        shutil.copy2(src / META, tmp / META)
        check_bundle(tmp)
        if bundle.exists():
            shutil.rmtree(bundle)
        os.replace(tmp, bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if (src / RESULTS).is_file():
        try:
            with tarfile.open(src / RESULTS) as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise JoinError(f"the bundle is joined, but {RESULTS} cannot be unpacked ({exc})") from None
    if (src / FIGURES).is_file():
        shutil.copy2(src / FIGURES, dest / FIGURES)
    print(f"joined {len(manifest['parts'])} parts into {bundle} (sha256 {manifest['sha256'][:12]}..., verified)")
    return 0


# ------------------------------------------------------------------------------------------------


def mib(text: str) -> int:
    """A size: bytes, or with a K/M suffix (KiB/MiB)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": MiB}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")

    pk = sub.add_parser("pack", help="Copy a split's train+val images, the split and ood-dev into .gpu/.")
    pk.add_argument("--data", type=Path, default=SHARED / "all4")
    pk.add_argument("--split", type=Path, help="RUN/split.csv (default: split DATA as bcc-train fit does)")
    pk.add_argument("--seed", type=int, default=0, help="split seed when no --split is given")
    pk.add_argument("--ood", type=Path, default=SHARED / "ood-dev")
    pk.add_argument("--dest", type=Path, default=PACK)
    pk.add_argument("--wheels", action="store_true", help=f"also download the GPU machine's missing wheels into {WHEELS}")

    rn = sub.add_parser("run", help="Tests, fit, evaluate, classify timing; results into OUT (default).")
    rn.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="output folder (default: $OUT)")
    rn.add_argument("--pack", type=Path, default=PACK, help="what `pack` wrote")
    rn.add_argument("--data", type=Path, help="default: PACK/data")
    rn.add_argument("--split", type=Path, help="default: PACK/split.csv")
    rn.add_argument("--ood", type=Path, help="default: PACK/ood")
    rn.add_argument("--work", type=Path, help="scratch folder (default: a new one in /tmp)")
    rn.add_argument("--recipe", default="gpu")
    rn.add_argument("--epochs", type=int, help="override the recipe's epochs")
    rn.add_argument("--fit-args", default="", help="more bcc-train fit options, one string (e.g. '--channels hue-free')")
    rn.add_argument("--device", default="cuda")
    rn.add_argument("--workers", type=int, help="fit's decoding threads (default: the CPUs, at most 16)")
    rn.add_argument("--classify-workers", type=int, nargs="+", help="bcc classify runs (default: 2 and 8 threads)")
    rn.add_argument("--tests-k", help="pytest -k for the CUDA tests")
    rn.add_argument("--tests-timeout", type=float, default=150.0, help="seconds; 0 skips the tests")
    rn.add_argument("--budget", type=float, help="seconds for every step together (default 560; dry run 7200)")
    rn.add_argument("--reserve", type=float, default=150.0, help="seconds the fit leaves for the later steps")
    rn.add_argument("--grace", type=float, default=30.0, help="seconds a step has to stop after SIGINT")
    rn.add_argument("--part-size", type=mib, help="bytes per weights part, K/M suffixes (default 15M; dry run 3M)")
    rn.add_argument("--dry-run", action="store_true", help="tiny settings on the CPU, to test this script")

    jn = sub.add_parser("join", help="Rebuild the bundle from the parts in SRC and verify it.")
    jn.add_argument("src", type=Path, help="the run's output folder (the device call's files)")
    jn.add_argument("--dest", type=Path, default=REPO / "runs" / "gpu",
                    help="DEST/bundle and the unpacked results (default runs/gpu: git-ignored, and not carried)")
    jn.add_argument("--force", action="store_true", help="replace DEST/bundle")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    if args.command == "pack":
        return cmd_pack(args)
    if args.command == "join":
        try:
            return cmd_join(args)
        except JoinError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.out is None:
        print("error: no output folder: set $OUT or pass --out", file=sys.stderr)
        return 2
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
