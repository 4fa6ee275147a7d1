"""What a run keeps to resume and to show: last.pt (pruned of the optimizer at the end),
best.safetensors and history.csv, each written atomically."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bcc_desk.files import atomic_write

log = logging.getLogger("bcc-train")


HISTORY_FIELDS = [
    "epoch", "lr", "train_loss", "train_acc", "train_macro_f1",
    "val_loss", "val_acc", "val_macro_f1", "val_shift_acc", "val_shift_macro_f1",
    "seconds", "train_images_per_s", "train_size", "val_seconds",
]



def read_history(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The first `epochs` rows of a history.csv (a checkpoint from before history was kept in it)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= epochs]
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in (None, "")} for r in rows]


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    atomic_write(path, write)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def atomic_torch_save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))




def prune_checkpoint(ckpt: Path) -> None:
    """Drop the optimizer's state from a finished run's checkpoint: AdamW's two moments are twice
    the weights (224 of the 449 MB of a convnext_tiny run's last.pt with EMA), and only resuming mid-run needs them.  A run
    extended later (`--epochs` raised) starts its optimizer afresh from the kept weights."""
    if not ckpt.is_file():
        return
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.pop("optimizer", None) is not None:
        atomic_torch_save(state, ckpt)
