"""From a decoded image to the network's input, the one way training, inference, int8 and
Grad-CAM all do it (as torchvision's references keep one `presets.py`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from bcc_desk.bundle import InputSpec


def make_transform(spec: InputSpec) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> uint8 CHW tensor of the bundle's input size (resize shorter side,
    centre crop).  Normalisation happens later, on the whole batch.

    These are the Pillow calls torchvision's Resize/CenterCrop/PILToTensor make on a PIL image
    (a test checks that the pixels are identical); torchvision itself is not imported because
    its import pulls in torch._dynamo, seconds of every run's start-up."""
    short = int(round(spec.size / spec.crop_pct))
    resample = Image.Resampling[spec.interpolation.upper()]
    size = spec.size

    def transform(image: Image.Image) -> torch.Tensor:
        w, h = image.size
        scaled = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if scaled != (w, h):
            image = image.resize(scaled, resample)
            w, h = scaled
        if (w, h) != (size, size):
            left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        # A CHW view, as torchvision's PILToTensor gives; the batch's stack makes it planar.  (A
        # torch op here, in a decoding thread, would start a second OpenMP team on the cores the
        # network is using: end to end fell from ~35 to 23-32 images/s.)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    return transform


def normalise(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (or 0..255 float) batch -> the network's normalised float input.  Shared with the
    trainer, so training and inference can never normalise differently."""
    if spec.channels == "hue-free":
        return hue_free(batch)
    if spec.channels == "hue-sat-free":
        return hue_sat_free(batch)
    shape = (1, 3, 1, 1)
    mean = torch.tensor(spec.mean, device=batch.device).view(shape) * 255
    std = torch.tensor(spec.std, device=batch.device).view(shape) * 255
    return (batch.float() - mean) / std


def pad_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last image up to `size`: a compiled network has one static batch size."""
    if len(batch) >= size:
        return batch
    return torch.cat([batch, batch[-1:].expand(size - len(batch), *batch.shape[1:])])


def hue_free(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) RGB batch -> per pixel its brightest channel, its darkest and their
    difference (HSV's value, V(1 - S) and chroma), centred on their image's means and scaled by
    their pooled spread.

    A hue rotation keeps every pixel's brightest and darkest channel, and a brightness or
    contrast change of the whole field scales or shifts them, which the standardisation takes
    out: what is left is the cells' pattern of light, dark and saturated, not the colours each
    class of this data set was photographed in (issue #35, recipe.md run 21).  Greyscale leaves
    no chroma; the colour check flags it before anyone reads the label."""
    x = batch.float()
    brightest, darkest = x.amax(dim=1), x.amin(dim=1)
    planes = torch.stack([brightest, darkest, brightest - darkest], dim=1)
    # One scale for the three planes (their pooled spread), so the planes keep their proportions
    # and a plane with little spread of its own has its noise left small, not blown up.
    centred = planes - planes.mean(dim=(2, 3), keepdim=True)
    return centred / centred.std(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)


def hue_sat_free(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) RGB batch -> per pixel its darkest channel and its chroma (brightest
    minus darkest), each standardised on its own image (the darkest channel twice: the network's
    stem takes three planes).

    Blind to hue as `hue_free` is, and to a saturation change too: a less (or more) saturated
    field (each pixel moved towards or away from its grey) scales every pixel's chroma by one
    factor, which the plane's own standardisation takes out, and barely moves the darkest
    channel.  The brightest channel is left out: on these fields it is nearly flat, so standardised
    alone it is mostly noise, and a saturation change moves it most (issue #35, recipe.md run 23).
    A plane with almost no spread (greyscale's chroma) stays flat, not noise blown up."""
    x = batch.float()
    darkest = x.amin(dim=1)
    chroma = x.amax(dim=1) - darkest
    planes = torch.stack([darkest, chroma, darkest], dim=1)
    centred = planes - planes.mean(dim=(2, 3), keepdim=True)
    return centred / centred.std(dim=(2, 3), keepdim=True).clamp_min(1.0)
