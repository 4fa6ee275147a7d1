"""What changes with the step or the epoch: the learning rate, the training resolution and the
order in which the images are drawn."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parse_size_schedule(text: str) -> list[tuple[int, int]]:
    """'96@1,112@31' -> [(1, 96), (31, 112)]: train at 96 px from epoch 1, at 112 from epoch 31.

    Progressive resizing (EfficientNetV2, FFCV): early epochs are cheaper at a lower resolution;
    validation and the bundle always use the run's --image-size."""
    schedule = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size, sep, epoch = part.partition("@")
        if not sep or not size.isdigit() or not epoch.isdigit() or int(size) < 16 or int(epoch) < 1:
            raise ValueError(f"--size-schedule: {part!r} is not SIZE@EPOCH (e.g. 96@1,112@31)")
        schedule.append((int(epoch), int(size)))
    schedule.sort()
    if schedule and schedule[0][0] != 1:
        raise ValueError("--size-schedule must start at epoch 1 (e.g. 96@1,112@31)")
    if len({e for e, _ in schedule}) != len(schedule):
        raise ValueError("--size-schedule names one epoch twice")
    return schedule


def train_size(schedule: list[tuple[int, int]], epoch: int, default: int) -> int:
    """The training resolution of 1-based `epoch` (the run's image size without a schedule)."""
    size = default
    for start, s in schedule:
        if epoch >= start:
            size = s
    return size


def epoch_cost(schedule: list[tuple[int, int]], epoch: int, default: int) -> float:
    """What epoch `epoch` (1-based) costs relative to one at the final size: its pixel count."""
    return (train_size(schedule, epoch, default) / default) ** 2


def seconds_left(elapsed: float, done: range, left: range, schedule: list[tuple[int, int]], default: int) -> float:
    """The time the epochs `left` will take at the pace of the epochs `done` (1-based) in `elapsed`
    seconds, each epoch weighted by its pixel count: under a size schedule an epoch at 160 px
    costs about twice one at 112, and an ETA from the plain mean would promise too early."""
    def cost(epochs: range) -> float:
        return sum(epoch_cost(schedule, e, default) for e in epochs)

    return elapsed / cost(done) * cost(left) if len(done) else 0.0


def epoch_order(labels: torch.Tensor, n_classes: int, balance: str, g: torch.Generator) -> torch.Tensor:
    """One epoch's image indices: a permutation, or (balance='sampler') as many draws with
    replacement, each class equally likely (oversampling the minority class; Buda et al. 2018)."""
    if balance != "sampler":
        return torch.randperm(len(labels), generator=g)
    weights = (1.0 / torch.bincount(labels, minlength=n_classes).clamp(min=1).float())[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=g)


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Loss weights that give every class the same total weight (balance='loss')."""
    counts = torch.bincount(labels.cpu(), minlength=n_classes).clamp(min=1).float()
    return counts.sum() / (n_classes * counts)


def parse_zoom(text: str) -> tuple[float, float]:
    """'0.8,1.25' -> (0.8, 1.25): the random zoom range (below 1: cells smaller, as at a lower
    magnification; above 1: larger)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--zoom: {text!r} is not MIN,MAX (e.g. 0.8,1.25)") from None
    if not 0.5 <= low <= high <= 2.0:
        raise ValueError(f"--zoom: {text!r} must satisfy 0.5 <= MIN <= MAX <= 2 (e.g. 0.8,1.25)")
    return low, high
