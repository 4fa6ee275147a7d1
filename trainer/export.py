"""A trained network written as a bundle: calibrated on validation, its OOD check and colour profile
fitted, its provenance recorded."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bcc_desk import __version__
from bcc_desk.bundle import Bundle, BundleMeta, BundleNet, OODSpec, build_model, save_bundle
from trainer.config import FitConfig
from trainer.data import ImageSet
from trainer.dataset import data_fingerprint
from trainer.epoch import predict_logits, scores
from trainer.split import Split

log = logging.getLogger("bcc-train")


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
        "val_macro_f1": scores(val.labels, val_logits)[2],
        "val_ece_before": float(expected_calibration_error(torch.softmax(val_logits, 1).numpy(), val.labels.numpy())),
        "val_ece_after": float(expected_calibration_error(probs.numpy(), val.labels.numpy())),
        "val_flagged_low_confidence": float((conf < review).float().mean()),
        "val_flagged_ood": float((torch.as_tensor(val_scores) > ood_threshold).float().mean()),
    }
    # ood_dev_flagged (with --ood-dir) is measured after export, in the application's own numerics
    # (`trainer/review_threshold.py`), once the threshold is chosen on them.
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
            "trivial_augment", "size_schedule", "colour", "jpeg", "zoom")},
        "device": str(device),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"bcc-desk": __version__, "torch": torch.__version__, "timm": timm_version()},
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




def timm_version() -> str:
    import timm

    return timm.__version__
