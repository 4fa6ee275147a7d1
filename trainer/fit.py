"""`bcc-train fit`: split, train, calibrate, and write a model bundle.

One code path for one CPU, one GPU and `torchrun` (DistributedDataParallel: NCCL on GPUs, gloo
on CPUs).  The images are decoded once and kept on the device; each epoch shuffles indices with
a seeded generator, so a run is repeatable and a resumed run continues the same sequence.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from bcc_desk.bundle import BundleMeta, InputSpec
from bcc_desk.devices import pick_precision
from trainer.augment import AugmentSpec
from trainer.checkpoint import atomic_torch_save, prune_checkpoint, read_history, save_weights, write_history
from trainer.config import FitConfig, FitError
from trainer.data import ImageSet, decode_images
from trainer.dataset import list_dataset
from trainer.distributed import Dist, init_distributed
from trainer.epoch import Trainee, colour_shifted, make_ema, make_mixup, train_one_epoch, validate
from trainer.export import export_bundle
from trainer.model_init import build_meta, child_meta, classes_as_parent, create_model, parent_bundle
from trainer.schedule import class_weights, epoch_cost, lr_factor, seconds_left
from trainer.split import Split, make_split

log = logging.getLogger("bcc-train")

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
        parent = parent_bundle(cfg)  # a bad bundle fails before the split's minutes
        if not (out / "split.csv").is_file():  # a resumed run was checked when it started
            _check_class_sizes(cfg.data, parent.meta if parent is not None else None, cfg.init_bundle)
        split = _split(cfg, env, out)
        if parent is not None:
            split.classes = classes_as_parent(split.classes, parent.meta, cfg.init_bundle)
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

    ema = make_ema(model, cfg.ema_decay)

    start_epoch, best_f1 = 0, -1.0
    history: list[dict[str, Any]] = []
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
        history = list(state["history"]) if "history" in state else read_history(out / "history.csv", start_epoch)
        if env.main:
            log.info("resuming after epoch %d of %d (best val macro-F1 %.4f)", start_epoch, cfg.epochs, best_f1)

    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    aug = AugmentSpec.for_training(cfg.stain, cfg.colour, (cfg.zoom[0], cfg.zoom[1]), cfg.trivial_augment, cfg.jpeg)
    trainee = Trainee(
        cfg=cfg, env=env, device=device, dtype=dtype, channels_last=channels_last, spec=meta.input,
        n_classes=len(classes), model=model, net=net,
        step_fn=torch.compile(net) if (cfg.compile if cfg.compile is not None else device.type == "cuda") else net,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema, mixer=make_mixup(cfg, len(classes)),
        class_weight=class_weights(train.labels, len(classes)).to(device) if cfg.balance == "loss" else None,
        aug=aug, images_at=train_images, steps_per_epoch=steps_per_epoch,
    )
    val_shifted = colour_shifted(val, aug) if cfg.colour and len(val) else None

    t_loop = time.perf_counter()
    with _progress(env.main) as bar:
        # The run's bar counts steps weighted by their pixels, so its time remaining holds
        # across a size schedule (an epoch at 160 px costs twice one at 112).
        total = steps_per_epoch * sum(epoch_cost(cfg.size_schedule, e, meta.input.size) for e in range(start_epoch + 1, cfg.epochs + 1))
        whole = bar.add_task("run", total=total, epoch=f"{start_epoch}/{cfg.epochs}", steps="")
        for epoch in range(start_epoch, cfg.epochs):
            bar.update(whole, epoch=f"{epoch + 1}/{cfg.epochs}")
            row = train_one_epoch(trainee, epoch, bar, whole)
            if env.main:
                checks, score = validate(trainee, val, val_shifted)
                row |= checks
                history.append(row)
                log.info(
                    "epoch %d/%d  loss %.4f  acc %.3f | val loss %.4f  acc %.3f  macro-F1 %.4f%s | %.0f s, %.1f img/s%s | %s",
                    epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
                    row["val_macro_f1"], "" if val_shifted is None else
                    f" | colour-shifted acc {row['val_shift_acc']:.3f}  macro-F1 {row['val_shift_macro_f1']:.4f}",
                    row["seconds"], row["train_images_per_s"], f" at {row['train_size']} px" if cfg.size_schedule else "",
                    _eta(time.perf_counter() - t_loop, range(start_epoch + 1, epoch + 2), range(epoch + 2, cfg.epochs + 1),
                         cfg.size_schedule, meta.input.size),
                )
                if score > best_f1:
                    best_f1 = score
                    save_weights(trainee.chosen(), out / "best.safetensors")
                atomic_torch_save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_f1": best_f1,
                     "history": history, **({"ema": ema.state_dict()} if ema is not None else {})},
                    ckpt,
                )
                # After the checkpoint, and rewritten whole from what it holds: an interruption
                # between the two never leaves history.csv a row ahead of (or behind) the checkpoint.
                write_history(out / "history.csv", history)
            env.barrier()

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
    # The review threshold is chosen on the application's own predictions (both numerics
    # when int8 is added): see trainer/review_threshold.py.
    from trainer.int8 import finish_for_app

    with_int8 = finish_for_app(bundle, cfg.data, out / "split.csv", split, workers=min(cfg.workers, 4),
                               ood_dir=cfg.ood_dir, int8=cfg.int8)
    seconds["int8 and thresholds" if cfg.int8 else "thresholds"], step = time.perf_counter() - step, time.perf_counter()
    # The colour check's cut-off: on validation under every shift of trainer/shifts.py, in the
    # numerics the application will run.
    from trainer.colour_check import choose_colour_cutoff
    from trainer.review_threshold import validation_truth

    if cfg.shift_table:
        choose_colour_cutoff(bundle, [cfg.data / p for p in split.paths("val")], cfg.data, validation_truth(split, meta),
                             precision="int8" if with_int8 else "fp32", workers=min(cfg.workers, 4))
        seconds["colour check"] = time.perf_counter() - step
    else:
        log.warning("no shift table (--no-shift-table): the colour check keeps its starting cut-off, which flags "
                    "fewer shifted images; before the model is used, `bcc-train colour-check %s %s --split %s` "
                    "chooses it under every shift", bundle, cfg.data, out / "split.csv")
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
        prune_checkpoint(out / "last.pt")
    return bundle


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


# -- helpers ------------------------------------------------------------------------------------------
def _check_class_sizes(data: Path, parent: BundleMeta | None, where: Path | None) -> None:
    """FitError, before any image is hashed or trained on, when the classes are not the parent's
    (a fine-tune) or a class has too few images."""
    try:
        counts = Counter(c for _, c in list_dataset(data))
    except ValueError as exc:
        raise FitError(str(exc)) from None
    if parent is not None:
        classes_as_parent(sorted(counts), parent, where)
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


