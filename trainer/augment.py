"""Batch augmentation on the device: the study's flips, rotation and brightness, and a little more.

A smear field has no up, down, left or right, so any rotation and both flips are label-safe;
stains and lamps vary between slides, so brightness, contrast and saturation jitter too.  Flips,
rotation and a mild zoom are one affine warp per image (one `grid_sample` for the whole batch,
reflection-padded so no black corners appear), which keeps augmentation a few milliseconds per
batch on a GPU and cheap next to the network on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentSpec:
    rotate: bool = True
    flip: bool = True
    zoom: tuple[float, float] = (1.0, 1.15)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.15


def augment(batch: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (n, 3, h, w) -> augmented float (n, 3, h, w) in [0, 255]."""
    n = batch.shape[0]
    dev = batch.device
    x = batch.float()

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device if generator else "cpu").to(dev)

    angle = (rand(n) * 2 * math.pi) if spec.rotate else torch.zeros(n, device=dev)
    zoom = spec.zoom[0] + rand(n) * (spec.zoom[1] - spec.zoom[0])
    sx = torch.where(rand(n) < 0.5, -1.0, 1.0) if spec.flip else torch.ones(n, device=dev)
    sy = torch.where(rand(n) < 0.5, -1.0, 1.0) if spec.flip else torch.ones(n, device=dev)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * sy, torch.zeros_like(cos)], 1),
         torch.stack([sin * sx, cos * sy, torch.zeros_like(cos)], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def jitter(strength: float) -> torch.Tensor:
        return (1 + (rand(n) * 2 - 1) * strength).view(n, 1, 1, 1)

    if spec.brightness:
        x = x * jitter(spec.brightness)
    if spec.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * jitter(spec.contrast) + mean
    if spec.saturation:
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * jitter(spec.saturation) + grey
    return x.clamp_(0, 255)
