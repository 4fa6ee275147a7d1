"""Benchmark `bcc classify` end to end against the bare forward pass and a plain fp32 loop.

    python bench/bench_classify.py [--images N] [--repeats R] [--model BUNDLE]

Side by side in one run, each figure the median of R interleaved repeats:
  * e2e:        `bcc classify` as a fresh process on N real images (start-up, model load,
                decoding, inference, Excel report all included), images / wall second;
  * forward:    the same model's bare forward pass on pre-decoded batches (no decoding, no
                I/O) at each numerics `bcc classify` can pick: bf16 eager and compiled, and
                static int8 compiled (what it picks for large runs of a bundle with an int8
                calibration; timed on all N images, just before the e2e run of each repeat),
                images / second;
  * first e2e:  the same, once, on a computer that has not built the model's int8 package yet;
  * fp32 loop:  a plain per-batch loop (decode a batch, then an fp32 forward; nothing
                overlapped), images / second.
It also reports how often bf16 and int8 agree with fp32 on the label, the int8 build time
(once per model and computer) and the time to load the kept package (every later run).
Figures go to stdout and, with --write, into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ALL4, REPO, cpu_name, publish

sys.path.insert(0, str(REPO / "tests"))

from bcc_desk.bundle import load_bundle, load_int8_calibration
from bcc_desk.devices import autocast, default_batch_size, pick_precision
from bcc_desk.heap import keep_freed_memory
from bcc_desk.images import discover_images, open_image
from bcc_desk.preprocess import make_transform, normalise, pad_batch
from bcc_desk.quantize import package_identity, quantize_int8


def make_folder(dest: Path, n: int) -> Path:
    """N real images, one slide folder per class (copied, as a lab's export would be)."""
    per_class = {d.name: sorted(d.glob("*.jpg")) for d in sorted(ALL4.iterdir()) if d.is_dir()}
    chosen = 0
    for i in range(max(len(v) for v in per_class.values())):
        for cls, files in per_class.items():
            if chosen == n:
                return dest
            if i < len(files):
                slide = dest / f"slide-{cls.replace(' ', '_').strip('[]')}"
                slide.mkdir(parents=True, exist_ok=True)
                shutil.copy(files[i], slide / files[i].name)
                chosen += 1
    return dest


def decoded_batches(bundle, paths, batch) -> list[torch.Tensor]:
    """uint8 batches, as the classifier's decoders hand them over."""
    tf = make_transform(bundle.meta.input)
    return [torch.stack([tf(open_image(p)) for p in paths[i : i + batch]]) for i in range(0, len(paths), batch)]


@torch.inference_mode()
def forward_rate(forward, batches, dtype) -> float:
    """Images/s of `forward` over pre-decoded batches (no decoding, no I/O)."""
    n = sum(len(b) for b in batches)
    with autocast(torch.device("cpu"), dtype):
        for _ in range(2):  # warm-up at the real batch shape (oneDNN picks kernels per shape)
            forward(batches[0])
        t = time.perf_counter()
        for x in batches:
            forward(x)
    return n / (time.perf_counter() - t)


@torch.inference_mode()
def fp32_loop_rate(bundle, paths, batch) -> float:
    """What a first, plain script does: decode a batch, run it in fp32, repeat."""
    spec = bundle.meta.input
    tf = make_transform(spec)
    model = bundle.model.to(memory_format=torch.contiguous_format)
    t = time.perf_counter()
    for i in range(0, len(paths), batch):
        model(normalise(torch.stack([tf(open_image(p)) for p in paths[i : i + batch]]), spec)).softmax(1)
    return len(paths) / (time.perf_counter() - t)


def e2e_rate(model_dir: Path, folder: Path, n: int, out: Path, data_home: Path) -> float:
    """`bcc classify` with its own defaults (what a technician gets); its per-user data
    directory (where the compiled int8 package is kept) is `data_home`."""
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bcc_desk", "classify", str(folder), "--model", str(model_dir),
         "--out", str(out), "--quiet"],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "XDG_DATA_HOME": str(data_home)},
    )
    return n / (time.perf_counter() - t)


def label_agreement(reference, forward, batches, dtype, inputs=None) -> float:
    """Share of images on which `forward` (given `inputs`, default the same `batches`) under
    `dtype` autocast gives fp32's label."""
    with torch.inference_mode():
        same = total = 0
        for x, y in zip(batches, inputs or batches):
            a = reference(x)[0].argmax(1)
            with autocast(torch.device("cpu"), dtype):
                b = forward(y)[0].argmax(1)
            same += int((a == b).sum())
            total += len(x)
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2722, help="images for the end-to-end run")
    ap.add_argument("--forward-images", type=int, default=512, help="images for the forward and fp32-loop runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", type=Path, help="bundle to time (default: the shipped model, else a random convnext_tiny)")
    ap.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    keep_freed_memory()  # the bare forward gets the classifier's heap setting too

    work = Path(tempfile.mkdtemp(prefix="bcc-bench-"))
    try:
        model_dir = args.model or REPO / "resources" / "models" / "default"
        weights_note = "shipped model"
        if not (model_dir / "bundle.json").is_file():
            from bundles import make_bundle

            model_dir = make_bundle(work / "tiny", arch="convnext_tiny", size=224, hidden=[512], dtype=torch.float16)
            weights_note = "random-weight convnext_tiny (no trained model shipped yet)"
        bundle = load_bundle(model_dir)
        folder = make_folder(work / "images", args.images)
        paths = discover_images(folder)
        sample = paths[:: max(1, len(paths) // args.forward_images)][: args.forward_images]
        bs = default_batch_size(torch.device("cpu"))
        raw = decoded_batches(bundle, sample, bs)  # the int8 package takes uint8, normalised inside
        batches = [normalise(b, bundle.meta.input) for b in raw]
        dtype = pick_precision(torch.device("cpu"))
        model = bundle.model
        compiled = torch.compile(model.forward_with_features, dynamic=False)
        int8 = None
        if bundle.meta.int8:
            def build_or_load():
                return quantize_int8(model, load_int8_calibration(bundle), bundle.meta.input, bs, dtype,
                                     identity=package_identity(bundle),
                                     cache_dir=work / "int8-cache")
            t = time.perf_counter()
            build_or_load()
            int8_build = time.perf_counter() - t  # first run on a computer: export ... compile
            t = time.perf_counter()
            int8 = build_or_load()
            int8_load = time.perf_counter() - t  # every later run: the kept package is loaded
            # The best numerics are timed on the very images the e2e run classifies, right before
            # it in each repeat: a 512-image burst catches the shared host's fast moments.
            every = [pad_batch(b, bs) for b in decoded_batches(bundle, paths, bs)]
        # The first `bcc classify` on a computer builds the int8 package; later runs load it.
        first_e2e = e2e_rate(model_dir, folder, len(paths), work / "r.xlsx", work / "data")
        rates: dict[str, list[float]] = {k: [] for k in (
            "forward", "forward_compiled", "forward_int8", "fp32_forward", "e2e", "fp32_loop", "fp32_loop_small")}
        for r in range(args.repeats):
            rates["forward"].append(forward_rate(model.forward_with_features, batches, dtype))
            rates["forward_compiled"].append(forward_rate(compiled, batches, dtype))
            rates["fp32_forward"].append(forward_rate(model.forward_with_features, batches, None))
            rates["forward_int8"].append(forward_rate(int8, every, dtype) * len(paths) / (bs * len(every))
                                         if int8 is not None else 0.0)
            rates["e2e"].append(e2e_rate(model_dir, folder, len(paths), work / "r.xlsx", work / "data"))
            rates["fp32_loop"].append(fp32_loop_rate(bundle, sample, 32))
            rates["fp32_loop_small"].append(fp32_loop_rate(bundle, sample, bs))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        # e2e over the best forward of the same repeat (minutes apart, not a whole run apart: the
        # host's speed drifts by 10-20% over a run on a shared machine)
        best_of = [max(f, c, i) for f, c, i in zip(rates["forward"], rates["forward_compiled"], rates["forward_int8"])]
        paired = statistics.median(e / b for e, b in zip(rates["e2e"], best_of))
        paired_loop = statistics.median(e / f for e, f in zip(rates["e2e"], rates["fp32_loop"]))
        full = [b for b in batches if len(b) == bs]  # the int8 graph has one static batch size
        agree = label_agreement(model.forward_with_features, model.forward_with_features, full, dtype)
        raw_full = [b for b in raw if len(b) == bs]
        agree_int8 = (label_agreement(model.forward_with_features, int8, full, dtype, raw_full)
                      if int8 is not None else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    best = max(med["forward"], med["forward_compiled"], med["forward_int8"])
    int8_row = (
        f"| bare forward, static int8 (linear layers; bf16 rest), batch {bs}, compiled, all {len(paths)} images "
        f"| {med['forward_int8']:.1f} "
        f"| {med['forward_int8'] / best:.2f} |"
        if int8 is not None else "| bare forward, static int8 | n/a | the bundle has no int8 calibration |"
    )
    lines = [
        f"### `bcc classify` on CPU, {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"model: {bundle.meta.arch} at {bundle.meta.input.size} px ({weights_note}); "
        f"median of {args.repeats} interleaved repeats.",
        "",
        "| measure | images/s | ratio |",
        "|---|---:|---:|",
        f"| bare forward, {precision} autocast, batch {bs} (pre-decoded) | {med['forward']:.1f} | {med['forward'] / best:.2f} |",
        f"| bare forward, {precision} autocast, batch {bs}, torch.compile | {med['forward_compiled']:.1f} "
        f"| {med['forward_compiled'] / best:.2f} |",
        int8_row,
        f"| bare forward, fp32, batch {bs} | {med['fp32_forward']:.1f} | {med['fp32_forward'] / best:.2f} |",
        f"| **`bcc classify` end to end** ({len(paths)} images, new process, defaults, report written) "
        f"| **{med['e2e']:.1f}** | **{med['e2e'] / best:.2f}** of the best forward |",
        f"| `bcc classify` end to end, first run on this computer (builds the int8 package) | {first_e2e:.1f} "
        f"| {first_e2e / best:.2f} |",
        f"| plain fp32 loop, batch 32 (decode a batch, then forward) | {med['fp32_loop']:.1f} "
        f"| e2e is **{med['e2e'] / med['fp32_loop']:.2f}x** this |",
        f"| plain fp32 loop, batch {bs} | {med['fp32_loop_small']:.1f} | e2e is {med['e2e'] / med['fp32_loop_small']:.2f}x this |",
        "",
        f"Paired within each repeat (median of the {args.repeats} per-repeat ratios): end to end is "
        f"**{paired:.2f}** of the best bare forward and **{paired_loop:.2f}x** the plain fp32 loop (batch 32). "
        "Per repeat (e2e / best forward): " + ", ".join(f"{e:.1f}/{b:.1f}" for e, b in zip(rates["e2e"], best_of)) + ".",
        "",
        f"bf16 agrees with fp32 on the label of {agree:.1%} of {sum(len(b) for b in full)} images"
        + (f", int8 on {agree_int8:.1%}. int8 set-up: {int8_build:.1f} s to build the package (export, "
           f"calibration, conversion, AOTInductor compilation; once per model and computer), "
           f"{int8_load:.2f} s to load it on every later run." if int8 is not None else "."),
        "",
    ]
    publish("\n".join(lines), args.write, "## `bcc classify`")

if __name__ == "__main__":
    main()
