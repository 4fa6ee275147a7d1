"""Small real bundles for the tests: random-weight timm models, saved and loaded the real way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from bcc_desk.bundle import BundleMeta, HeadSpec, InputSpec, OODSpec, build_model, save_bundle

from conftest import CLASSES, LABELS  # noqa: F401 - the four class folders and their names


def make_bundle(
    folder: Path,
    arch: str = "convnext_atto",
    size: int = 64,
    seed: int = 0,
    classes: list[str] | None = None,
    hidden: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    ood_threshold: float | None = None,
    ood_features: str = "pooled",
    channels: str = "rgb",
    **meta: object,
) -> Path:
    """Save a random-weight bundle; with `ood_threshold`, unit OOD statistics around zero."""
    torch.manual_seed(seed)
    m = BundleMeta(
        name=f"test-{arch}-{seed}",
        arch=arch,
        classes=list(classes or CLASSES),
        input=InputSpec(size=size, channels=channels),
        head=HeadSpec(hidden=hidden or [], dropout=0.1 if hidden else 0.0),
        ood=OODSpec(threshold=ood_threshold, features=ood_features) if ood_threshold is not None else None,
        provenance={"test": True, "seed": seed},
        metrics={"val_macro_f1": 0.5},
        **meta,  # type: ignore[arg-type]
    )
    model = build_model(m)
    # Spread the head's outputs so labels and confidences differ between images.
    with torch.no_grad():
        model.head[-1].weight.mul_(20)
    if model.has_ood:
        model.ood_means.zero_()
        model.ood_precision.copy_(torch.eye(model.num_features))
    return save_bundle(model, m, folder, dtype=dtype)


def set_field(path: str, value: object) -> Callable[[dict], None]:
    """An edit of a parsed bundle.json: the field at the dotted `path` set to `value` (the
    hostile-input tests and `bench/hostile.py` forge bundles with it)."""
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
    return change
