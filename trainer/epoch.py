"""A training epoch (`train_one_epoch`) and its validation (`validate`), over what a run made once
(`Trainee`); their parts: predictions on a decoded set, their scores, the EMA of the weights, mixup
and the colour-shifted validation the kept epoch is also chosen on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from bcc_desk.bundle import InputSpec
from bcc_desk.devices import autocast
from bcc_desk.preprocess import normalise
from trainer.augment import AugmentSpec, augment
from trainer.config import FitConfig, FitError
from trainer.data import ImageSet
from trainer.distributed import Dist
from trainer.schedule import epoch_cost, epoch_order, train_size

log = logging.getLogger("bcc-train")


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: ImageSet, spec: InputSpec, device: torch.device,
    dtype: torch.dtype | None, batch_size: int, channels_last: bool, features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (and the OOD check's features) for a decoded set, in order, without augmentation."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        x = normalise(images.images[i : i + batch_size].to(device), spec)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out, f = net.forward_with_features(x)
        logits.append(out.float().cpu())
        if features:
            feats.append(f.float().cpu())
    empty = torch.empty(0, len(net.head[-1].weight))
    return (torch.cat(logits) if logits else empty), (torch.cat(feats) if features and feats else None)


def scores(labels: torch.Tensor, logits: torch.Tensor) -> tuple[float, float, float]:
    loss = float(F.cross_entropy(logits, labels)) if len(labels) else float("nan")
    pred = logits.argmax(1)
    acc = float((pred == labels).float().mean()) if len(labels) else float("nan")
    # Macro over the classes present: a cross-validation fold whose slides hold no image of a
    # class would otherwise count that class as an F1 of 0 (#37).
    present = labels.unique().numpy()
    f1 = float(f1_score(labels.numpy(), pred.numpy(), labels=present, average="macro", zero_division=0)) if len(labels) else float("nan")
    return loss, acc, f1




def colour_shifted(val: ImageSet, aug: AugmentSpec) -> ImageSet:
    """Validation once more, each image under a fixed random draw of the training's colour jitter."""
    g = torch.Generator().manual_seed(0)
    images = torch.cat([augment(val.images[i : i + 64], aug.colour_only, generator=g) for i in range(0, len(val), 64)])
    return ImageSet(images.round().to(torch.uint8), val.labels, val.paths)


def make_ema(model: torch.nn.Module, decay: float):
    """timm's EMA of the weights, kept in fp32 beside the model (None when decay is 0)."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def make_mixup(cfg: FitConfig, n_classes: int):
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    if cfg.batch_size % 2:
        raise FitError("--mixup/--cutmix need an even --batch-size")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=n_classes)


@dataclass
class Trainee:
    """What every epoch of a run works on, made once by `fit`: the network (`model`; `net` is the
    one stepped, wrapped for torchrun and compiled where that pays), its optimiser, schedule, EMA
    and mixup, and the training images at each size of the schedule (`images_at`)."""

    cfg: FitConfig
    env: Dist
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    spec: InputSpec
    n_classes: int
    model: torch.nn.Module
    net: torch.nn.Module
    step_fn: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: Any
    mixer: Any
    class_weight: torch.Tensor | None
    aug: AugmentSpec
    images_at: Callable[[int], ImageSet]
    steps_per_epoch: int

    def chosen(self) -> torch.nn.Module:
        """The weights that are validated, kept as best and shipped: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def train_one_epoch(t: Trainee, epoch: int, bar: Any, whole: Any) -> dict[str, float]:
    """One epoch of training (`epoch` 0-based), advancing the progress bars; returns its row of
    history.csv so far (loss, accuracy and macro-F1 on the augmented batches, time, rate)."""
    cfg, env = t.cfg, t.env
    t_epoch = time.perf_counter()
    t.net.train()
    # Every random draw of an epoch (order, augmentation, mixup, drop-path, dropout) comes from
    # seeds of (seed, epoch), so a run resumed after epoch k repeats an uninterrupted one.
    seed = cfg.seed * 1000 + epoch
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    np.random.seed(seed + 2)
    order = epoch_order(t.images_at(t.spec.size).labels.cpu(), t.n_classes, cfg.balance, g)
    order = order[: t.steps_per_epoch * cfg.batch_size * env.world]
    mine = order[env.rank :: env.world]
    size = train_size(cfg.size_schedule, epoch + 1, t.spec.size)
    images = t.images_at(size)
    losses, preds, targets = [], [], []
    task = bar.add_task("epoch", total=t.steps_per_epoch, epoch=f"{epoch + 1}/{cfg.epochs}", steps=f"0/{t.steps_per_epoch}")
    cost = epoch_cost(cfg.size_schedule, epoch + 1, t.spec.size)
    for b in range(t.steps_per_epoch):
        idx = mine[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(t.device)
        x = normalise(augment(images.images[idx], t.aug, generator=g), t.spec)
        y = images.labels[idx]
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = y
        if t.mixer is not None:
            x, target = t.mixer(x, y)  # soft targets; label smoothing is applied by Mixup
        with autocast(t.device, t.dtype):
            logits = t.step_fn(x)
            if t.mixer is not None:
                loss = torch.sum(-target * F.log_softmax(logits.float(), -1), -1).mean()
            else:
                loss = F.cross_entropy(logits.float(), y, weight=t.class_weight, label_smoothing=cfg.label_smoothing)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        if t.ema is not None:
            t.ema.update(t.model)
        # Kept on the device: a .cpu() per step would stall a GPU every batch.
        losses.append(loss.detach())
        preds.append(logits.detach().argmax(1))
        targets.append(y)
        bar.update(task, advance=1, steps=f"{b + 1}/{t.steps_per_epoch}")
        bar.advance(whole, cost)
    bar.remove_task(task)
    p, y_all = torch.cat(preds).cpu(), torch.cat(targets).cpu()
    seconds = time.perf_counter() - t_epoch
    return {
        "epoch": epoch + 1, "lr": t.scheduler.get_last_lr()[0], "train_loss": float(torch.stack(losses).mean()),
        "train_acc": float((p == y_all).float().mean()),
        "train_macro_f1": float(f1_score(y_all.numpy(), p.numpy(), average="macro", zero_division=0)),
        "seconds": seconds, "train_images_per_s": t.steps_per_epoch * cfg.batch_size * env.world / seconds,
        "train_size": size,
    }


def validate(t: Trainee, val: ImageSet, val_shifted: ImageSet | None) -> tuple[dict[str, float], float]:
    """The chosen weights on validation (and on its colour-shifted copy, with the colour recipe):
    the row's validation columns, and the score the kept epoch is chosen on."""
    t_val = time.perf_counter()
    bs = t.cfg.batch_size * 2
    val_logits, _ = predict_logits(t.chosen(), val, t.spec, t.device, t.dtype, bs, t.channels_last)
    val_loss, val_acc, val_f1 = scores(val.labels, val_logits)
    shift_acc = shift_f1 = float("nan")
    score = val_f1
    if val_shifted is not None:
        # A model that is right only in its own lab's colours is not the one to keep: the epoch is
        # chosen on unshifted and colour-shifted validation alike.
        shifted_logits, _ = predict_logits(t.chosen(), val_shifted, t.spec, t.device, t.dtype, bs, t.channels_last)
        _, shift_acc, shift_f1 = scores(val.labels, shifted_logits)
        score = (val_f1 + shift_f1) / 2
    return {"val_loss": val_loss, "val_acc": val_acc, "val_macro_f1": val_f1, "val_shift_acc": shift_acc,
            "val_shift_macro_f1": shift_f1, "val_seconds": time.perf_counter() - t_val}, score
