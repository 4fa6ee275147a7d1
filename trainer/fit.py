"""`bcc-train fit`: split, train, calibrate, and write a model bundle.

One code path for one CPU, one GPU and `torchrun` (DistributedDataParallel: NCCL on GPUs, gloo
on CPUs).  The images are decoded once and kept on the device; each epoch shuffles indices with
a seeded generator, so a run is repeatable and a resumed run continues the same sequence.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score

from bcc_desk import __version__
from bcc_desk.bundle import Bundle, BundleError, BundleMeta, BundleNet, HeadSpec, InputSpec, OODSpec, build_model, save_bundle
from bcc_desk.devices import autocast, pick_device, pick_precision
from bcc_desk.files import atomic_write
from bcc_desk.preprocess import normalise
from trainer.augment import AugmentSpec, augment
from trainer.data import ImageSet, decode_images
from trainer.dataset import data_fingerprint, list_dataset
from trainer.schedule import class_weights, epoch_cost, epoch_order, lr_factor, seconds_left, train_size
from trainer.split import Split, make_split

log = logging.getLogger("bcc-train")

HISTORY_FIELDS = [
    "epoch", "lr", "train_loss", "train_acc", "train_macro_f1",
    "val_loss", "val_acc", "val_macro_f1", "val_shift_acc", "val_shift_macro_f1",
    "seconds", "train_images_per_s", "train_size", "val_seconds",
]


class FitError(Exception):
    """A problem the user can fix; the message is one line."""


@dataclass
class FitConfig:
    data: Path
    out: Path
    arch: str = "convnext_tiny"
    epochs: int = 25
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    warmup_epochs: float = 1.0
    image_size: int = 224
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = 4
    init: str = "none"
    """'pretrained' (timm's ImageNet weights, downloaded), 'none', or a local weights file."""
    init_bundle: Path | None = None
    """Fine-tune: start from this bundle's weights (trunk and head), its classes and input size."""
    split: Path | None = None
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.3
    drop_path: float = 0.1
    label_smoothing: float = 0.0
    channels_last: bool | None = None
    compile: bool | None = None
    ood_dir: Path | None = None
    weights_dtype: str = "float16"
    name: str | None = None
    int8: bool = True
    """Add checked static int8 to the bundle (bcc-train int8) where this machine can run it."""
    keep_checkpoint: bool = False
    """Keep last.pt whole at the end; by default its optimizer state (half of it, with EMA) is dropped."""
    cv_folds: int | None = None
    """Cross-validate over this many folds of the slides (0: not); None: 5 for under 1,000 images
    (trainer/crossval.py)."""
    finish: bool = True
    """Calibrate and write the bundle after training (a cross-validation fold only trains)."""
    limit_per_class: int | None = None
    """Use only the first N training images per class (quick trials and tests)."""
    recipe: str | None = None
    """The named preset (trainer/recipes.py) these settings started from, for the provenance."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights per step (0: off); validated and shipped when on."""
    balance: str = "none"
    """'sampler' draws every class equally often per epoch, 'loss' weights the loss, 'none'."""
    stain: float = 0.0
    """HED stain jitter strength (trainer/augment.py)."""
    colour: float = 0.0
    """Colour augmentation strength (hue, saturation, white balance, greyscale, defocus:
    `AugmentSpec.for_training`); above 0 the kept epoch is also chosen on colour-shifted validation."""
    zoom: tuple[float, float] = (1.0, 1.15)
    """Random zoom range (below 1: cells smaller, as at a lower magnification)."""
    mixup: float = 0.0
    """timm Mixup's alpha (0: off)."""
    cutmix: float = 0.0
    """timm CutMix's alpha (0: off); with mixup too, each batch uses one of them."""
    trivial_augment: bool = False
    """torchvision's TrivialAugmentWide per image, before the geometric and colour jitter."""
    size_schedule: list[tuple[int, int]] = field(default_factory=list)
    """(first epoch, training size) pairs, 1-based (trainer/schedule.py); validation and the
    bundle use image_size."""


# -- distributed ----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; NCCL when every rank has a GPU, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


# -- model ------------------------------------------------------------------------------------------
def build_meta(cfg: FitConfig, classes: list[str]) -> BundleMeta:
    import timm

    if not timm.is_model(cfg.arch):
        raise FitError(f"unknown timm architecture {cfg.arch!r} (see timm.list_models())")
    data_cfg = timm.get_pretrained_cfg(cfg.arch)
    mean = tuple(data_cfg.mean) if data_cfg else InputSpec().mean
    std = tuple(data_cfg.std) if data_cfg else InputSpec().std
    return BundleMeta(
        name=cfg.name or f"bcc-{cfg.arch}-{datetime.now(timezone.utc):%Y%m%d-%H%M}",
        arch=cfg.arch,
        classes=classes,
        # The fields are whole 224-px images: resize to the input size, no centre crop.
        input=InputSpec(size=cfg.image_size, crop_pct=1.0, interpolation="bicubic", mean=mean, std=std),
        head=HeadSpec(hidden=list(cfg.hidden), dropout=cfg.dropout),
        # Written out, so that a lab can rename a class in bundle.json without retraining.
        display_names=BundleMeta(name="", arch=cfg.arch, classes=classes).labels,
    )


def child_meta(cfg: FitConfig, parent: BundleMeta) -> BundleMeta:
    """A fine-tuned model's description: the parent's network, classes (and their display names)
    and input (at `cfg.image_size`, which may step up from the parent's), under a new name;
    calibration and the OOD check are fitted again at export."""
    return BundleMeta(
        name=cfg.name or f"{parent.name}-ft-{datetime.now(timezone.utc):%Y%m%d-%H%M}",
        arch=parent.arch, classes=list(parent.classes), input=replace(parent.input, size=cfg.image_size),
        head=parent.head,
        display_names=list(parent.labels),
    )


def _parent_bundle(cfg: FitConfig) -> Bundle:
    from bcc_desk.bundle import load_bundle

    try:
        parent = load_bundle(cfg.init_bundle, build=False)
    except BundleError as exc:
        raise FitError(f"--init-bundle: {exc}") from None
    # The input size may change (a resolution step: ConvNeXt's trunk and head do not depend on it);
    # the network and the head's shape must not, or the parent's weights would not fit.
    if parent.meta.arch != cfg.arch or parent.meta.head.hidden != list(cfg.hidden):
        raise FitError(
            f"--init-bundle: {parent.name} is {parent.meta.arch} with a head of "
            f"{parent.meta.head.hidden}; leave out --arch and --hidden (or give those)"
        )
    return parent


def _classes_as_parent(data_classes: list[str], parent: BundleMeta, where: Path | None) -> list[str]:
    """DATA's class folders in the parent's output order; the classes must be the same."""
    order: dict[int, str] = {}
    for c in data_classes:
        i = parent.class_index(c)
        if i is None:
            raise FitError(
                f"--init-bundle: the data's class {c!r} is not one of {Path(where or '').name}'s classes "
                f"({', '.join(parent.labels)}); fine-tuning keeps the classes, train from scratch to change them"
            )
        if i in order:
            raise FitError(f"--init-bundle: the data's folders {order[i]!r} and {c!r} are both the class {parent.labels[i]}")
        order[i] = c
    missing = [parent.labels[i] for i in range(len(parent.classes)) if i not in order]
    if missing:
        raise FitError(f"--init-bundle: the data has no images of {', '.join(missing)}; fine-tuning keeps every class")
    return [order[i] for i in range(len(parent.classes))]


def create_model(cfg: FitConfig, meta: BundleMeta, parent: Bundle | None = None) -> BundleNet:
    """The network with its initial weights: a parent bundle's, timm's ImageNet trunk (offline:
    one line), a local trunk file, or none."""
    if parent is not None:
        model = build_model(meta, drop_path_rate=cfg.drop_path)
        # Weights only: the OOD statistics belong to the parent's training data and are refitted.
        state = {k: v.float() for k, v in parent.state.items() if not k.startswith("ood_")}
        model.load_state_dict(state, strict=True)
        return model
    if cfg.init == "pretrained":
        return _pretrained_model(cfg, meta)
    model = build_model(meta, drop_path_rate=cfg.drop_path)
    if cfg.init not in ("none", ""):
        load_trunk_weights(model, Path(cfg.init))
    return model


def _pretrained_model(cfg: FitConfig, meta: BundleMeta) -> BundleNet:
    """timm's ImageNet weights: from the local cache, or downloaded when the hub answers.

    The hub is probed first (a few seconds at most) because an unreachable hub otherwise costs
    a minute of retries before any error; offline, only the cache is tried."""
    from huggingface_hub import constants

    online = not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT)
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not online
    try:
        return build_model(meta, pretrained=True, drop_path_rate=cfg.drop_path)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        why = "no network access to the model hub" if not online else type(exc).__name__
        raise FitError(
            f"cannot get ImageNet weights for {cfg.arch} ({why}); "
            "use --init-weights FILE (a local timm weights file) or --no-pretrained"
        ) from None
    finally:
        constants.HF_HUB_OFFLINE = saved


def _reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_trunk_weights(model: BundleNet, path: Path) -> None:
    """Initialise the trunk from a local timm weights file (.safetensors, or .pth/.bin read with
    weights_only=True so a file cannot run code); the classifier head is left fresh."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise FitError(f"--init-weights: {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the verdict below says it
            warnings.simplefilter("ignore", UserWarning)
            state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FitError(f"--init-weights: {path} is not a readable weights file ({type(exc).__name__})") from None
    own = model.trunk.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.9 * len(own):
        raise FitError(
            f"--init-weights: {path} does not fit {model.trunk.default_cfg.get('architecture', 'the trunk')}: "
            f"only {len(usable)} of {len(own)} trunk tensors match"
        )
    model.trunk.load_state_dict(usable, strict=False)


# -- training --------------------------------------------------------------------------------------
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


def _scores(labels: torch.Tensor, logits: torch.Tensor) -> tuple[float, float, float]:
    loss = float(F.cross_entropy(logits, labels)) if len(labels) else float("nan")
    pred = logits.argmax(1)
    acc = float((pred == labels).float().mean()) if len(labels) else float("nan")
    # Macro over the classes present: a cross-validation fold whose slides hold no image of a
    # class would otherwise count that class as an F1 of 0 (#37).
    present = labels.unique().numpy()
    f1 = float(f1_score(labels.numpy(), pred.numpy(), labels=present, average="macro", zero_division=0)) if len(labels) else float("nan")
    return loss, acc, f1


def fit(cfg: FitConfig) -> Path:
    """Train and export; returns the bundle folder (RUN/bundle)."""
    env, device = init_distributed(cfg.device)
    try:
        return _fit(cfg, env, device)
    finally:
        if env.world > 1:
            dist.destroy_process_group()


MIN_IMAGES_PER_CLASS = 10
"""Fewer images of a class cannot give training, validation and test each a share of it."""


def _fit(cfg: FitConfig, env: Dist, device: torch.device) -> Path:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        parent = _parent_bundle(cfg) if cfg.init_bundle else None  # a bad bundle fails before the split's minutes
        if not (out / "split.csv").is_file():  # a resumed run was checked when it started
            _check_class_sizes(cfg.data, parent.meta if parent is not None else None, cfg.init_bundle)
        split = _split(cfg, env, out)
        if parent is not None:
            split.classes = _classes_as_parent(split.classes, parent.meta, cfg.init_bundle)
        _check_parts(split, ("train", "val") if cfg.finish else ("train",))  # a fold's slides may hold no image of a class
    except FitError:
        if created and env.main:  # a run refused before it trained leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    classes = split.classes
    dtype = pick_precision(device, cfg.precision)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    meta = build_meta(cfg, classes) if parent is None else child_meta(cfg, parent.meta)

    train_paths, train_labels = split.paths("train"), split.labels("train")
    if cfg.limit_per_class:
        keep = _first_per_class(train_labels, cfg.limit_per_class)
        train_paths, train_labels = [train_paths[i] for i in keep], [train_labels[i] for i in keep]
    t0 = time.perf_counter()
    train = decode_images(cfg.data, train_paths, train_labels, meta.input, cfg.workers).to(device)
    val = decode_images(cfg.data, split.paths("val"), split.labels("val"), meta.input, cfg.workers)
    # The training images at each size of the schedule, decoded once each with the application's
    # own resize (so an image at 112 px in training is the very image the application sees).
    train_at: dict[int, ImageSet] = {meta.input.size: train}

    def train_images(size: int) -> ImageSet:
        if size not in train_at:
            spec = InputSpec(**{**asdict(meta.input), "size": size})
            train_at[size] = decode_images(cfg.data, train_paths, train_labels, spec, cfg.workers).to(device)
        return train_at[size]

    if env.main:
        log.info("decoded %d train and %d val images in %.1f s", len(train), len(val), time.perf_counter() - t0)

    model = create_model(cfg, meta, parent).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [
        {"params": [p for n, p in model.named_parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.lr, **({"fused": True} if device.type == "cuda" else {}))
    steps_per_epoch = max(1, len(train) // (cfg.batch_size * env.world))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    ema = _make_ema(model, cfg.ema_decay)

    start_epoch, best_f1, history = 0, -1.0, []
    ckpt = out / "last.pt"
    if ckpt.is_file():
        # Our own checkpoint; still read with weights_only=True (tensors and numbers only).
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        elif env.main:
            log.warning("%s was pruned when its run finished (--keep-checkpoint keeps it whole): the optimizer starts "
                        "afresh from its weights", ckpt)
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            if "ema" not in state:
                raise FitError(f"{ckpt} was written without EMA; resume with the settings it started with")
            ema.load_state_dict(state["ema"])
        start_epoch, best_f1 = int(state["epoch"]), float(state["best_f1"])
        history = list(state["history"]) if "history" in state else _read_history(out / "history.csv", start_epoch)
        if env.main:
            log.info("resuming after epoch %d of %d (best val macro-F1 %.4f)", start_epoch, cfg.epochs, best_f1)

    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_fn = torch.compile(net) if (cfg.compile if cfg.compile is not None else device.type == "cuda") else net
    aug = AugmentSpec.for_training(cfg.stain, cfg.colour, tuple(cfg.zoom), cfg.trivial_augment)
    val_shifted = _shifted(val, aug) if cfg.colour and len(val) else None
    mixer = _make_mixup(cfg, len(classes))
    class_weight = class_weights(train.labels, len(classes)).to(device) if cfg.balance == "loss" else None

    def chosen() -> torch.nn.Module:
        """The weights that are validated, kept as best and shipped: the EMA's when there is one."""
        return ema.module if ema is not None else model

    def run_epoch(epoch: int, bar, whole, best_f1: float) -> float:
        """One epoch of training, then (main process) validation, history and checkpoints;
        returns the best validation macro-F1 so far."""
        t_epoch = time.perf_counter()
        net.train()
        # Every random draw of an epoch (order, augmentation, mixup, drop-path, dropout) comes from
        # seeds of (seed, epoch), so a run resumed after epoch k repeats an uninterrupted one.
        seed = cfg.seed * 1000 + epoch
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + 1)
        np.random.seed(seed + 2)
        order = epoch_order(train.labels.cpu(), len(classes), cfg.balance, g)
        order = order[: steps_per_epoch * cfg.batch_size * env.world]
        mine = order[env.rank :: env.world]
        size = train_size(cfg.size_schedule, epoch + 1, meta.input.size)
        images = train_images(size)
        losses, preds, targets = [], [], []
        task = bar.add_task("epoch", total=steps_per_epoch, epoch=f"{epoch + 1}/{cfg.epochs}", steps=f"0/{steps_per_epoch}")
        cost = epoch_cost(cfg.size_schedule, epoch + 1, meta.input.size)
        for b in range(steps_per_epoch):
            idx = mine[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(device)
            x = normalise(augment(images.images[idx], aug, generator=g), meta.input)
            y = images.labels[idx]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = y
            if mixer is not None:
                x, target = mixer(x, y)  # soft targets; label smoothing is applied by Mixup
            with autocast(device, dtype):
                logits = step_fn(x)
                if mixer is not None:
                    loss = torch.sum(-target * F.log_softmax(logits.float(), -1), -1).mean()
                else:
                    loss = F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            # Kept on the device: a .cpu() per step would stall a GPU every batch.
            losses.append(loss.detach())
            preds.append(logits.detach().argmax(1))
            targets.append(y)
            bar.update(task, advance=1, steps=f"{b + 1}/{steps_per_epoch}")
            bar.advance(whole, cost)
        bar.remove_task(task)
        train_loss = float(torch.stack(losses).mean())
        p, t = torch.cat(preds).cpu(), torch.cat(targets).cpu()
        train_acc = float((p == t).float().mean())
        train_f1 = float(f1_score(t.numpy(), p.numpy(), average="macro", zero_division=0))
        seconds = time.perf_counter() - t_epoch
        if env.main:
            t_val = time.perf_counter()
            val_logits, _ = predict_logits(chosen(), val, meta.input, device, dtype, cfg.batch_size * 2, channels_last)
            val_loss, val_acc, val_f1 = _scores(val.labels, val_logits)
            shift_acc = shift_f1 = float("nan")
            score = val_f1
            if val_shifted is not None:
                # A model that is right only in its own lab's colours is not the one to keep:
                # the epoch is chosen on unshifted and colour-shifted validation alike.
                shifted_logits, _ = predict_logits(chosen(), val_shifted, meta.input, device, dtype, cfg.batch_size * 2, channels_last)
                _, shift_acc, shift_f1 = _scores(val.labels, shifted_logits)
                score = (val_f1 + shift_f1) / 2
            row = {
                "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
                "train_acc": train_acc, "train_macro_f1": train_f1, "val_loss": val_loss, "val_acc": val_acc,
                "val_macro_f1": val_f1, "val_shift_acc": shift_acc, "val_shift_macro_f1": shift_f1, "seconds": seconds,
                "train_images_per_s": steps_per_epoch * cfg.batch_size * env.world / seconds,
                "train_size": size, "val_seconds": time.perf_counter() - t_val,
            }
            history.append(row)
            log.info(
                "epoch %d/%d  loss %.4f  acc %.3f | val loss %.4f  acc %.3f  macro-F1 %.4f%s | %.0f s, %.1f img/s%s | %s",
                epoch + 1, cfg.epochs, train_loss, train_acc, val_loss, val_acc, val_f1,
                "" if val_shifted is None else f" | colour-shifted acc {shift_acc:.3f}  macro-F1 {shift_f1:.4f}", seconds,
                row["train_images_per_s"], f" at {size} px" if cfg.size_schedule else "",
                _eta(time.perf_counter() - t_loop, range(start_epoch + 1, epoch + 2), range(epoch + 2, cfg.epochs + 1),
                     cfg.size_schedule, meta.input.size),
            )
            if score > best_f1:
                best_f1 = score
                _save_weights(chosen(), out / "best.safetensors")
            _atomic_torch_save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_f1": best_f1,
                 "history": history, **({"ema": ema.state_dict()} if ema is not None else {})},
                ckpt,
            )
            # After the checkpoint, and rewritten whole from what it holds: an interruption
            # between the two never leaves history.csv a row ahead of (or behind) the checkpoint.
            _write_history(out / "history.csv", history)
        env.barrier()
        return best_f1

    t_loop = time.perf_counter()
    with _progress(env.main) as bar:
        # The run's bar counts steps weighted by their pixels, so its time remaining holds
        # across a size schedule (an epoch at 160 px costs twice one at 112).
        total = steps_per_epoch * sum(epoch_cost(cfg.size_schedule, e, meta.input.size) for e in range(start_epoch + 1, cfg.epochs + 1))
        whole = bar.add_task("run", total=total, epoch=f"{start_epoch}/{cfg.epochs}", steps="")
        for epoch in range(start_epoch, cfg.epochs):
            bar.update(whole, epoch=f"{epoch + 1}/{cfg.epochs}")
            best_f1 = run_epoch(epoch, bar, whole, best_f1)

    if not env.main:
        return out / "bundle"
    if not cfg.finish:  # a cross-validation fold: its history holds what it was trained for
        return out
    # Where a run's time goes after training (issue #37: on a lab's small fine-tune the finishing
    # steps took about three times the training): recorded with the bundle's metrics.
    seconds = {"training": time.perf_counter() - t_loop}
    step = time.perf_counter()
    best = out / "best.safetensors"
    if best.is_file():
        model.load_state_dict(load_file(str(best)))
    bundle = export_bundle(cfg, meta, model, train, val, split, device, dtype, channels_last, parent)
    seconds["calibration and export"], step = time.perf_counter() - step, time.perf_counter()
    # The review threshold is settled on the application's own predictions (both numerics
    # when int8 is added): see trainer/review_threshold.py.
    from trainer.int8 import settle_for_app

    with_int8 = settle_for_app(bundle, cfg.data, out / "split.csv", split, workers=min(cfg.workers, 4),
                               ood_dir=cfg.ood_dir, int8=cfg.int8)
    seconds["int8 and thresholds" if cfg.int8 else "thresholds"], step = time.perf_counter() - step, time.perf_counter()
    # The colour check's cut-off: on validation under every shift of trainer/shifts.py, in the
    # numerics the application will run.
    from trainer.colour_check import settle_colour_check
    from trainer.review_threshold import validation_truth

    settle_colour_check(bundle, [cfg.data / p for p in split.paths("val")], cfg.data, validation_truth(split, meta),
                        precision="int8" if with_int8 else "fp32", workers=min(cfg.workers, 4))
    seconds["colour check"] = time.perf_counter() - step
    from bcc_desk.bundle import record_thresholds
    from trainer.crossval import cross_validate, folds_for
    from trainer.verdict import judge_bundle

    if folds := folds_for(cfg, split, env.world):
        step = time.perf_counter()
        try:
            result = cross_validate(cfg, split, folds, fit)
        except (FitError, ValueError) as exc:  # the model is written: the folds only measure it
            log.warning("no cross-validation: %s", exc)
        else:
            record_thresholds(bundle, {"crossval": {k: v for k, v in result.items() if k != "folds"} | {"folds": len(result["folds"])}})
            lo, hi = result["accuracy_ci"]
            log.info("cross-validated over %d folds of the slides: accuracy %.1f%% (95%% CI %.1f-%.1f%%); %s", folds,
                     100 * result["accuracy_mean"], 100 * lo, 100 * hi, out / "crossval" / "crossval.md")
        seconds["cross-validation"] = time.perf_counter() - step
    record_thresholds(bundle, {"fit_seconds": {k: round(v, 1) for k, v in seconds.items()}})
    log.info("time: %s", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    judge_bundle(bundle, split)  # last: it reads every figure the steps above recorded
    if not cfg.keep_checkpoint:
        _prune_checkpoint(out / "last.pt")
    return bundle


def _prune_checkpoint(ckpt: Path) -> None:
    """Drop the optimizer's state from a finished run's checkpoint: AdamW's two moments are twice
    the weights (224 of the 449 MB of a convnext_tiny run's last.pt with EMA), and only resuming mid-run needs them.  A run
    extended later (`--epochs` raised) starts its optimizer afresh from the kept weights."""
    if not ckpt.is_file():
        return
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.pop("optimizer", None) is not None:
        _atomic_torch_save(state, ckpt)


def _progress(enabled: bool):
    """A progress bar on the same console as the log lines (so neither garbles the other)."""
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = next((h.console for h in log.handlers if isinstance(h, RichHandler)), None) or Console(stderr=True)
    return Progress(
        # Two bars: this epoch (its steps), and the whole run (its time remaining is the run's ETA).
        TextColumn("{task.description} {task.fields[epoch]}"), BarColumn(), TextColumn("{task.fields[steps]}"),
        TimeRemainingColumn(),
        console=console, disable=not enabled, transient=True,
    )


def export_bundle(
    cfg: FitConfig, meta: BundleMeta, model: BundleNet, train: ImageSet, val: ImageSet, split: Split,
    device: torch.device, dtype: torch.dtype | None, channels_last: bool, parent: Bundle | None = None,
) -> Path:
    """Calibrate on validation, fit the OOD check, and write RUN/bundle."""
    from trainer.colour_check import fit_colour_check
    from trainer.metrics import (
        choose_ood_threshold,
        choose_review_threshold,
        expected_calibration_error,
        fit_mahalanobis,
        fit_temperature,
        mahalanobis_scores,
    )

    out = Path(cfg.out)
    bs = cfg.batch_size * 2
    model.ood_features = "stage"  # see OODSpec: the features that tell other labs' images apart
    # The images stay where they are (on the GPU when training there); batches move as needed.
    _, train_feats = predict_logits(model, train, meta.input, device, dtype, bs, channels_last, features=True)
    val_logits, val_feats = predict_logits(model, val, meta.input, device, dtype, bs, channels_last, features=True)
    temperature = fit_temperature(val_logits, val.labels)
    probs = torch.softmax(val_logits / temperature, 1)
    conf, pred = probs.max(1)
    correct = pred == val.labels
    review = choose_review_threshold(conf.numpy(), correct.numpy())
    means, precision = fit_mahalanobis(train_feats.numpy(), train.labels.cpu().numpy(), len(meta.classes))
    val_scores = mahalanobis_scores(val_feats.numpy(), means, precision)
    ood_threshold = choose_ood_threshold(val_scores)

    meta.temperature = float(temperature)
    meta.review_threshold = float(review)
    meta.ood = OODSpec(threshold=float(ood_threshold), features=model.ood_features)
    meta.colour = fit_colour_check(train.images, train.labels, val.images, len(meta.classes))
    metrics: dict[str, Any] = {
        "val_accuracy": float(correct.float().mean()),
        "val_macro_f1": _scores(val.labels, val_logits)[2],
        "val_ece_before": float(expected_calibration_error(torch.softmax(val_logits, 1).numpy(), val.labels.numpy())),
        "val_ece_after": float(expected_calibration_error(probs.numpy(), val.labels.numpy())),
        "val_flagged_low_confidence": float((conf < review).float().mean()),
        "val_flagged_ood": float((torch.as_tensor(val_scores) > ood_threshold).float().mean()),
    }
    # ood_dev_flagged (with --ood-dir) is measured after export, in the application's own numerics
    # (`trainer/review_threshold.py`), once the threshold is settled on them.
    meta.metrics = metrics
    meta.provenance = {
        "data_fingerprint": data_fingerprint(cfg.data),
        "split_sha256": split.sha256(),
        "split_counts": {s: sum(c.values()) for s, c in split.counts().items()},
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "init": _init_text(cfg, parent),
        "recipe": {k: v for k, v in asdict(cfg).items() if k in (
            "recipe", "arch", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs", "image_size",
            "hidden", "dropout", "drop_path", "label_smoothing", "ema_decay", "balance", "stain", "mixup", "cutmix",
            "trivial_augment", "size_schedule", "colour", "zoom")},
        "device": str(device),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"bcc-desk": __version__, "torch": torch.__version__, "timm": _timm_version()},
    }
    if parent is not None:
        meta.provenance["parent"] = {"name": parent.name, "sha256": parent.sha256}
    if reviews := _reviews_learned(cfg.data, split):
        meta.provenance["reviews"] = reviews
    final = build_model(meta)
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    state["ood_means"] = torch.as_tensor(means, dtype=torch.float32)
    state["ood_precision"] = torch.as_tensor(precision, dtype=torch.float32)
    final.load_state_dict(state, strict=True)
    # OOD statistics stay float32 whatever the weights' dtype: distances are sensitive to rounding.
    bundle = save_bundle(final, meta, out / "bundle", dtype=getattr(torch, cfg.weights_dtype))
    (out / "metrics_val.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("bundle written to %s (T=%.3f, review < %.3f, OOD > %.1f)", bundle, temperature, review, ood_threshold)
    return bundle


def _init_text(cfg: FitConfig, parent: Bundle | None) -> str:
    if parent is not None:
        return f"bundle:{parent.name}"
    if cfg.init == "pretrained":
        return "imagenet"
    return "from scratch" if cfg.init in ("none", "") else f"file:{Path(cfg.init).name}"


def _reviews_learned(data: Path, split: Split) -> list[dict[str, Any]]:
    """The review workbooks (DATA/reviews.csv) whose images this model trained on: name, sha256
    and how many of their images fell in each part."""
    from trainer.manifest import read_manifest

    part = {r.path: r.split for r in split.rows}
    books: dict[tuple[str, str], dict[str, Any]] = {}
    for row in read_manifest(data):
        if row["path"] in part:
            book = books.setdefault((row["source"], row["source_sha256"]), {
                "workbook": row["source"], "sha256": row["source_sha256"], "model": row["model"],
                "images": {"train": 0, "val": 0, "test": 0}})
            book["images"][part[row["path"]]] += 1
    return list(books.values())


# -- helpers ------------------------------------------------------------------------------------------
def _shifted(val: ImageSet, aug: AugmentSpec) -> ImageSet:
    """Validation once more, each image under a fixed random draw of the training's colour jitter."""
    g = torch.Generator().manual_seed(0)
    images = torch.cat([augment(val.images[i : i + 64], aug.colour_only, generator=g) for i in range(0, len(val), 64)])
    return ImageSet(images.round().to(torch.uint8), val.labels, val.paths)


def _make_ema(model: torch.nn.Module, decay: float):
    """timm's EMA of the weights, kept in fp32 beside the model (None when decay is 0)."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def _make_mixup(cfg: FitConfig, n_classes: int):
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    if cfg.batch_size % 2:
        raise FitError("--mixup/--cutmix need an even --batch-size")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=n_classes)


def _check_class_sizes(data: Path, parent: BundleMeta | None, where: Path | None) -> None:
    """FitError, before any image is hashed or trained on, when the classes are not the parent's
    (a fine-tune) or a class has too few images."""
    try:
        counts = Counter(c for _, c in list_dataset(data))
    except ValueError as exc:
        raise FitError(str(exc)) from None
    if parent is not None:
        _classes_as_parent(sorted(counts), parent, where)
    small = {c: n for c, n in counts.items() if n < MIN_IMAGES_PER_CLASS}
    if small:
        raise FitError(f"too few images to train and judge a model: {', '.join(f'{c} {n}' for c, n in small.items())} "
                       f"(each class needs at least {MIN_IMAGES_PER_CLASS}, for training, validation and test)")


def _check_parts(split: Split, parts: tuple[str, ...]) -> None:
    """FitError when a class is missing from one of `parts` (a given split can leave one out)."""
    counts = split.counts()
    empty = [f"{c} has no {part} image" for part in parts for c, n in counts[part].items() if n == 0]
    if empty:
        raise FitError(f"the split cannot train and judge every class: {'; '.join(empty)} "
                       f"(train {sum(counts['train'].values())}, val {sum(counts['val'].values())}, "
                       f"test {sum(counts['test'].values())} images)")


def _split(cfg: FitConfig, env: Dist, out: Path) -> Split:
    """A given split, the run's own from an earlier (interrupted) run, or a new one."""
    target = out / "split.csv"
    # A resumed run keeps the split it started with, even if DATA has gained images since.
    source = target if target.is_file() else cfg.split
    if source is not None:
        try:
            split = Split.load(source, cfg.data)
            # A split given from an earlier run (the parent's, when fine-tuning) takes the images
            # added since (reviews) as new groups; every image it lists keeps its part.
            added = split.extend(cfg.data, seed=cfg.seed) if source != target else 0
        except ValueError as exc:
            raise FitError(str(exc)) from None
        if env.main and added:
            log.info("%d images of %s are not in %s: added to the split as new groups", added, cfg.data, source)
        if env.main and Path(source).resolve() != target.resolve():
            split.save(target)
        env.barrier()
        return split if env.main or source == target else Split.load(target, cfg.data)
    if env.main:
        try:
            split = make_split(cfg.data, seed=cfg.seed)
        except ValueError as exc:
            raise FitError(str(exc)) from None
        split.save(target)
    env.barrier()
    return split if env.main else Split.load(target, cfg.data)


def _eta(elapsed: float, done: range, left: range, schedule: list[tuple[int, int]], size: int) -> str:
    """'12 epochs left, done about 14:05' from this session's pace (validation included)."""
    if not left:
        return "last epoch"
    finish = datetime.now() + timedelta(seconds=seconds_left(elapsed, done, left, schedule, size))
    return f"{len(left)} epoch{'s' if len(left) > 1 else ''} left, done about {finish:%H:%M}"


def _first_per_class(labels: list[int], n: int) -> list[int]:
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        if seen.get(y, 0) < n:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    return keep


def _read_history(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The first `epochs` rows of a history.csv (a checkpoint from before history was kept in it)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= epochs]
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in (None, "")} for r in rows]


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    atomic_write(path, write)


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def _atomic_torch_save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _timm_version() -> str:
    import timm

    return timm.__version__
