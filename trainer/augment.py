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
from dataclasses import dataclass, replace

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
    hue: float = 0.0
    """Hue rotation in degrees: each image's hue turned by U(-hue, hue)."""
    gain: float = 0.0
    """White balance: each colour channel scaled by U(1-gain, 1+gain) on its own."""
    greyscale: float = 0.0
    """Probability that an image loses its colour altogether."""
    blur: float = 0.0
    """Probability of a Gaussian defocus of sigma U(0.5, 2) pixels."""
    jpeg: float = 0.0
    """Probability that an image is JPEG-compressed at quality U(15, 60), last, as a camera's
    export or an archive does after the stain and the lamp."""

    @classmethod
    def for_training(cls, stain: float, colour: float, zoom: tuple[float, float], trivial: bool,
                     jpeg: float = 0.0) -> AugmentSpec:
        """The training augmentation for `bcc-train fit`'s settings.  `colour` 0 is the jitter
        the shipped v4 was trained with; 1 turns hue, saturation, brightness, contrast and
        white balance as far as another lab's stain and camera do (bench/shift.py's moderate
        shifts: hue 20 degrees, saturation x0.6, brightness x0.8), drops the colour from a tenth
        of the images and defocuses a fifth, so that colour stops naming the class.  `jpeg` is the
        share of images compressed (0: none)."""
        if not colour:
            return cls(stain=stain, zoom=zoom, trivial=trivial, jpeg=jpeg)
        return cls(
            stain=stain, zoom=zoom, trivial=trivial, jpeg=jpeg, brightness=0.3 * colour, contrast=0.3 * colour,
            saturation=0.5 * colour, hue=25.0 * colour, gain=0.12 * colour, greyscale=0.1 * colour,
            blur=0.2 * colour,
        )

    @property
    def colour_only(self) -> AugmentSpec:
        """The same photometric jitter without the geometry: the colour shifts validation is
        also scored under."""
        return replace(self, rotate=False, flip=False, zoom=(1.0, 1.0), trivial=False)


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
    if spec.hue:
        x = rotate_hue(x, (rand(n) * 2 - 1) * spec.hue)
    if spec.gain:
        x = x * (1 + (rand(n, 3) * 2 - 1) * spec.gain).view(n, 3, 1, 1)
    if spec.brightness:
        x = x * jitter(spec.brightness)
    if spec.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * jitter(spec.contrast) + mean
    if spec.saturation:
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * jitter(spec.saturation) + grey
    if spec.greyscale:
        drop = (rand(n) < spec.greyscale).view(n, 1, 1, 1)
        x = torch.where(drop, x.mean(dim=1, keepdim=True).expand_as(x), x)
    if spec.blur:
        x = defocus(x, torch.where(rand(n) < spec.blur, 0.5 + rand(n) * 1.5, torch.zeros(n, device=dev)))
    x = x.clamp_(0, 255)
    if spec.jpeg:
        x = compress(x, torch.where(rand(n) < spec.jpeg, 15 + rand(n) * 45, torch.zeros(n, device=dev)))
    return x


def rotate_hue(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """float (n, 3, h, w) in [0, 255] -> each image's hue turned by `degrees` (n,), with
    torchvision's HSV round trip (the same hue a photo editor or PIL's HSV turns)."""
    from torchvision.transforms.v2.functional import adjust_hue

    out = x.clamp(0, 255) / 255
    return torch.stack([adjust_hue(img, float(d) / 360) if d else img for img, d in zip(out, degrees)]) * 255


def defocus(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """float (n, 3, h, w) -> each image blurred by a Gaussian of `sigma` (n,) pixels (0: as is)."""
    from torchvision.transforms.v2.functional import gaussian_blur

    return torch.stack([gaussian_blur(img, [9, 9], [float(s)]) if s > 0 else img for img, s in zip(x, sigma)])


def compress(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """float (n, 3, h, w) in [0, 255] -> each image through a JPEG of `quality` (n,) and back
    (0: as is), with torchvision's libjpeg (4:2:0 chroma, as cameras and PIL save)."""
    from torchvision.io import decode_jpeg, encode_jpeg

    def through(img: torch.Tensor, q: float) -> torch.Tensor:
        data = encode_jpeg(img.round().to(torch.uint8).cpu(), quality=int(q))
        return decode_jpeg(data).to(x.device, x.dtype)

    return torch.stack([through(img, float(q)) if q > 0 else img for img, q in zip(x, quality)])


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
