"""Training throughput by resolution: the bare step against `bcc-train fit` itself, side by side.

    python bench/bench_train.py [--sizes 112,128,160,224] [--steps 6] [--write]

Real images from ../shared/data/all4, decoded once as the trainer does.  Per resolution, in one
run: the bare step at the machine's own precision (bf16 where the CPU has it, else fp32), in the
default memory layout and in channels_last (augment, forward, backward, AdamW; median of `--steps`
steps after two warm-up steps), then a real `fit` with the `cpu` recipe (balanced sampling, stain jitter, EMA,
label smoothing) on a subset for two epochs, whose second epoch gives the training phase's
images/s; the validation time of the real 411-image split is measured in the same fit, and the
projected epoch (1,905 training + 411 validation images) follows.  On a CUDA machine it also
times the GPU's bare step (bf16 + channels_last, with and without compile).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bcc_desk.devices import autocast, pick_precision
from bcc_desk.preprocess import normalise
from trainer.augment import AugmentSpec, augment
from trainer.config import FitConfig
from trainer.data import decode_images
from trainer.dataset import list_dataset
from trainer.fit import fit
from trainer.model_init import build_meta, create_model
from trainer.recipes import recipe_settings

from common import ALL4, cpu_name, publish  # bench/ is the script's own folder


def step_rate(cfg: FitConfig, meta, images, device: torch.device, dtype, steps: int, channels_last: bool,
              compile_: bool) -> float:
    model = create_model(cfg, meta).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x_all, y_all = images.images.to(device), images.labels.to(device)
    times = []
    for i in range(steps + 2):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x = normalise(augment(x_all[idx], AugmentSpec(), generator=g), meta.input)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            loss = F.cross_entropy(fwd(x).float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return cfg.batch_size / statistics.median(times)


def fit_rates(size: int, per_class: int) -> tuple[float, float]:
    """(training images/s of fit's second epoch, seconds to validate the 411-image split)."""
    # At `size` throughout: the recipe's own size schedule would mix sizes within the measurement.
    settings = {**recipe_settings("cpu"), "image_size": size, "size_schedule": [], "epochs": 2}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # finish=False: training and validation only, as a cross-validation fold (no export or checks).
        fit(FitConfig(data=ALL4, out=Path(tmp), limit_per_class=per_class, int8=False, finish=False, recipe="cpu",
                      **settings))
        with open(Path(tmp) / "history.csv", newline="") as fh:
            last = list(csv.DictReader(fh))[-1]
    return float(last["train_images_per_s"]), float(last["val_seconds"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="convnext_tiny")
    ap.add_argument("--sizes", default="112,128,160,224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--per-class", type=int, default=48, help="training images per class in the fit runs")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    everything = list_dataset(ALL4)
    items = everything[::10][:256]
    classes = sorted({c for _, c in everything})
    cpu = torch.device("cpu")
    dtype = pick_precision(cpu)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        cfg = FitConfig(data=ALL4, out=Path("."), arch=args.arch, image_size=size, batch_size=args.batch_size,
                        stain=0.05)
        meta = build_meta(cfg, classes)
        images = decode_images(ALL4, [p for p, _ in items], [classes.index(c) for _, c in items], meta.input)
        bare = step_rate(cfg, meta, images, cpu, dtype, args.steps, False, False)
        bare_cl = step_rate(cfg, meta, images, cpu, dtype, args.steps, True, False)
        train_rate, val_s = fit_rates(size, args.per_class)
        epoch_s = 1905 / train_rate + val_s
        rows.append((size, bare, bare_cl, train_rate, val_s, epoch_s))
        print(f"{size} px: bare {bare:.1f} img/s, channels_last {bare_cl:.1f}, fit {train_rate:.1f} img/s, "
              f"validation {val_s:.1f} s", flush=True)
    gpu_rows = []
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        name = torch.cuda.get_device_name(0)
        cfg = FitConfig(data=ALL4, out=Path("."), arch=args.arch, image_size=224, batch_size=64)
        meta = build_meta(cfg, classes)
        images = decode_images(ALL4, [p for p, _ in items], [classes.index(c) for _, c in items], meta.input)
        gpu_rows.append((f"{name}, bf16 + channels_last", step_rate(cfg, meta, images, gpu, torch.bfloat16, 20, True, False)))
        gpu_rows.append((f"{name}, bf16 + channels_last + compile",
                         step_rate(cfg, meta, images, gpu, torch.bfloat16, 20, True, True)))
    lines = [
        f"### Training throughput by resolution, {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.arch}, batch "
        f"{args.batch_size}, {'bf16 autocast' if dtype is not None else 'fp32'}. Bare step: augment + forward + "
        f"backward + AdamW, median of {args.steps} steps, in the default layout and in channels_last. `fit` "
        f"(in the layout the trainer picks on this CPU): the `cpu` recipe's training phase (balanced sampling, stain jitter, EMA "
        f"update, label smoothing, bookkeeping), second epoch of a {4 * args.per_class}-image run; "
        "validation: the 411 real validation images with the EMA weights. Epoch: 1,905 training images "
        "at fit's rate plus validation.",
        "",
        "| size | bare step, images/s | channels_last, images/s | `fit` training, images/s | validation, s | epoch, s |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {size} | {bare:.1f} | {cl:.1f} ({cl / bare:.2f}x) | {rate:.1f} | {val:.1f} | {ep:.0f} |"
          for size, bare, cl, rate, val, ep in rows),
        "",
        *(["GPU bare step at 224 px, batch 64: " + "; ".join(f"{n}: {r:.0f} images/s" for n, r in gpu_rows), ""]
          if gpu_rows else []),
    ]
    publish("\n".join(lines), args.write, "## `bcc-train`")


if __name__ == "__main__":
    main()
