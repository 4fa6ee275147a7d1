"""Training throughput of `bcc-train fit`'s step (augment, forward, backward, AdamW) in images/s.

    python bench/bench_train.py [--arch convnext_tiny] [--image-size 224] [--steps 6] [--write]

Real images from ../shared/data/all4, decoded once as the trainer does; each figure is the
median step time over `--steps` steps after two warm-up steps, bf16 autocast and fp32 side by
side in one run.  On a CUDA machine it also times the GPU (bf16 + channels_last + compile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bcc_desk.classifier import autocast, normalise
from trainer.augment import AugmentSpec, augment
from trainer.data import decode_images
from trainer.fit import FitConfig, build_meta, create_model
from trainer.split import list_dataset

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="convnext_tiny")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    cfg = FitConfig(data=ALL4, out=Path("."), arch=args.arch, image_size=args.image_size, batch_size=args.batch_size)
    everything = list_dataset(ALL4)
    items = everything[::10][:256]
    classes = sorted({c for _, c in everything})
    meta = build_meta(cfg, classes)
    images = decode_images(ALL4, [p for p, _ in items], [classes.index(c) for _, c in items], meta.input)
    cpu = torch.device("cpu")
    rows = [
        ("CPU, bf16 autocast", step_rate(cfg, meta, images, cpu, torch.bfloat16, args.steps, False, False)),
        ("CPU, fp32", step_rate(cfg, meta, images, cpu, None, args.steps, False, False)),
    ]
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        name = torch.cuda.get_device_name(0)
        rows.append((f"{name}, bf16 + channels_last", step_rate(cfg, meta, images, gpu, torch.bfloat16, 20, True, False)))
        rows.append((f"{name}, bf16 + channels_last + compile", step_rate(cfg, meta, images, gpu, torch.bfloat16, 20, True, True)))
    lines = [
        f"### Training step throughput, {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.arch} at "
        f"{args.image_size} px, batch {args.batch_size}, augmentation on the device, AdamW; median of "
        f"{args.steps} steps after 2 warm-up steps.",
        "",
        "| where | images/s |",
        "|---|---:|",
        *(f"| {name} | {rate:.1f} |" for name, rate in rows),
        "",
    ]
    publish("\n".join(lines), args.write, "## `bcc-train`")

if __name__ == "__main__":
    main()
