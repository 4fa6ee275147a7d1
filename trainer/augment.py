"""Batch augmentation on the device: the study's flips, rotation and brightness, and a little more.

A smear field has no up, down, left or right, so any rotation and both flips are label-safe;
stains and lamps vary between slides, so brightness, contrast and saturation jitter too, and the
stain itself in optical density (HED jitter, Tellez et al. 2019: the main lever for generalising
across slides and labs).  Flips, rotation and a mild zoom are one affine warp per image (one
`grid_sample` for the whole batch, reflection-padded so no black corners appear), which keeps
augmentation a few milliseconds per batch on a GPU and cheap next to the network on a CPU.
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
    stain: float = 0.0
    """HED jitter strength sigma: each stain's density scaled by U(1-s, 1+s) and shifted by U(-s, s)."""
    trivial: bool = False
    """torchvision's TrivialAugmentWide (one random operation of random strength per image)."""


# Ruifrok & Johnston's H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB in RGB optical
# density), as scikit-image's `rgb_from_hed`; Giemsa-type smear stains are not exactly H&E, but
# the basis separates the nuclear (blue-purple) and cytoplasm/red-cell (pink) densities well
# enough for jitter, which is all it is used for here.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def augment(batch: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (n, 3, h, w) -> augmented float (n, 3, h, w) in [0, 255]."""
    n = batch.shape[0]
    dev = batch.device
    if spec.trivial:
        batch = trivial_augment(batch, generator)
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

    if spec.stain:
        x = stain_jitter(x, (1 + (rand(n, 3) * 2 - 1) * spec.stain), (rand(n, 3) * 2 - 1) * spec.stain)
    if spec.brightness:
        x = x * jitter(spec.brightness)
    if spec.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * jitter(spec.contrast) + mean
    if spec.saturation:
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * jitter(spec.saturation) + grey
    return x.clamp_(0, 255)


def stain_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """float (n, 3, h, w) in [0, 255] -> the same field with each stain's density scaled by
    `scale` (n, 3) and shifted by `shift` (n, 3) in HED space (scale 1, shift 0: unchanged)."""
    od = -torch.log((x + 1) / 256)  # optical density per RGB channel; +1 keeps black finite
    hed = torch.einsum("nchw,cd->ndhw", od, HED_FROM_RGB.to(x.device))
    hed = hed * scale[:, :, None, None] + shift[:, :, None, None]
    od = torch.einsum("ndhw,dc->nchw", hed, RGB_FROM_HED.to(x.device))
    return (256 * torch.exp(-od) - 1).clamp_(0, 255)


def trivial_augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """TrivialAugmentWide on each uint8 image of the batch, its random draws seeded from
    `generator` so that a seeded batch is augmented the same way every time."""
    from torchvision.transforms import v2

    op = v2.TrivialAugmentWide()
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([op(img) for img in batch])
