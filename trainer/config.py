"""What a `bcc-train fit` run is asked to do (`FitConfig`), and the one-line error it can end in."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("bcc-train")


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
    shift_table: bool = True
    """Classify validation under every shift of trainer/shifts.py to choose the colour check's
    cut-off and record the shift table (the longest finishing step on a CPU); without it the
    check keeps its starting cut-off until `bcc-train colour-check` adds them."""
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
    jpeg: float = 0.0
    """Share of training images JPEG-compressed at quality 15-60 (`AugmentSpec.jpeg`)."""
    channels: str = "rgb"
    """What the network sees of a pixel (`InputSpec.channels`): 'rgb', 'hue-free' or 'hue-sat-free'."""
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
