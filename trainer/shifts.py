"""The acquisition shifts another lab's slides bring: stain, hue, saturation, brightness and
contrast, white balance, no colour at all, focus, compression, the camera's resolution and the
objective's magnification, each at two or more strengths.

Each shift turns a field as a file holds it (a Pillow RGB image) into the field another lab's
stain, lamp, camera or microscope would have given, independently of the training augmentation
(Pillow's own colour operations, not `trainer.augment`'s), so that `bench/shift.py` measures what
training did not simply copy.  `moderate` marks the shifts any other lab's slides show (issue
#35's bar: at least 90% right under them); the others are there to find where the model or its
colour check gives way.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from trainer.augment import stain_jitter


@dataclass(frozen=True)
class Shift:
    name: str
    family: str
    apply: Callable[[Image.Image], Image.Image]
    moderate: bool = False


def _hue(degrees: float) -> Callable[[Image.Image], Image.Image]:
    def turn(img: Image.Image) -> Image.Image:
        h, s, v = img.convert("HSV").split()
        step = int(round(degrees / 360 * 256))
        h = h.point(lambda x: (x + step) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    return turn


def _enhance(kind: type[ImageEnhance.Color | ImageEnhance.Contrast | ImageEnhance.Brightness | ImageEnhance.Sharpness],
             factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: kind(img).enhance(factor)


def _gains(red: float, green: float, blue: float) -> Callable[[Image.Image], Image.Image]:
    """A camera's white balance: each channel scaled on its own."""
    def balance(img: Image.Image) -> Image.Image:
        x = np.asarray(img, dtype=np.float32) * np.array([red, green, blue], np.float32)
        return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
    return balance


def _stain(haematoxylin: float, eosin: float) -> Callable[[Image.Image], Image.Image]:
    """More or less of each stain (optical density scaled in HED space: a longer staining time,
    another batch)."""
    def stain(img: Image.Image) -> Image.Image:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        out = stain_jitter(x, torch.tensor([[haematoxylin, eosin, 1.0]]), torch.zeros(1, 3))
        return Image.fromarray(out[0].permute(1, 2, 0).round().to(torch.uint8).numpy())
    return stain


def _greyscale(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def _blur(sigma: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: img.filter(ImageFilter.GaussianBlur(sigma))


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def compress(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    return compress


def _resolution(factor: float) -> Callable[[Image.Image], Image.Image]:
    """A camera with `factor` of the pixels per side, its image shown at the usual size."""
    def lower(img: Image.Image) -> Image.Image:
        w, h = img.size
        small = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)
        return small.resize((w, h), Image.Resampling.BICUBIC)
    return lower


def _magnification(factor: float) -> Callable[[Image.Image], Image.Image]:
    """Another objective: cells `factor` times as large.  Zoomed in, the field's centre; zoomed
    out, the field mirrored at its edges fills the frame (more cells, as a wider field shows)."""
    def magnify(img: Image.Image) -> Image.Image:
        w, h = img.size
        scaled = img.resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)
        if factor >= 1:
            left, top = (scaled.width - w) // 2, (scaled.height - h) // 2
            return scaled.crop((left, top, left + w, top + h))
        x = np.asarray(scaled)
        pw, ph = w - x.shape[1], h - x.shape[0]
        return Image.fromarray(np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect"))
    return magnify


SHIFTS: tuple[Shift, ...] = (
    Shift("none", "none", lambda img: img),
    Shift("stain H x1.2", "stain", _stain(1.2, 1.0)),
    Shift("stain H x0.8", "stain", _stain(0.8, 1.0)),
    Shift("stain E x1.3", "stain", _stain(1.0, 1.3)),
    Shift("stain E x0.7", "stain", _stain(1.0, 0.7)),
    Shift("stain H x1.4 E x0.6", "stain", _stain(1.4, 0.6)),
    Shift("hue +10", "hue", _hue(10)),
    Shift("hue -10", "hue", _hue(-10)),
    Shift("hue +20", "hue", _hue(20), moderate=True),
    Shift("hue -20", "hue", _hue(-20), moderate=True),
    Shift("hue +40", "hue", _hue(40)),
    Shift("hue -40", "hue", _hue(-40)),
    Shift("saturation x0.6", "saturation", _enhance(ImageEnhance.Color, 0.6), moderate=True),
    Shift("saturation x0.3", "saturation", _enhance(ImageEnhance.Color, 0.3)),
    Shift("saturation x1.4", "saturation", _enhance(ImageEnhance.Color, 1.4)),
    Shift("brightness x0.8", "brightness/contrast", _enhance(ImageEnhance.Brightness, 0.8), moderate=True),
    Shift("brightness x0.6", "brightness/contrast", _enhance(ImageEnhance.Brightness, 0.6)),
    Shift("brightness x1.15", "brightness/contrast", _enhance(ImageEnhance.Brightness, 1.15)),
    Shift("contrast x0.7", "brightness/contrast", _enhance(ImageEnhance.Contrast, 0.7)),
    Shift("contrast x1.3", "brightness/contrast", _enhance(ImageEnhance.Contrast, 1.3)),
    Shift("white balance warm (R x1.08, B x0.90)", "white balance", _gains(1.08, 1.0, 0.90)),
    Shift("white balance cool (R x0.92, B x1.10)", "white balance", _gains(0.92, 1.0, 1.10)),
    Shift("white balance strong warm (R x1.15, B x0.80)", "white balance", _gains(1.15, 1.0, 0.80)),
    Shift("white balance green (G x1.10)", "white balance", _gains(1.0, 1.10, 1.0)),
    Shift("greyscale", "greyscale", _greyscale),
    Shift("blur sigma 1", "defocus", _blur(1.0), moderate=True),
    Shift("blur sigma 2", "defocus", _blur(2.0)),
    Shift("JPEG quality 30", "compression", _jpeg(30), moderate=True),
    Shift("JPEG quality 10", "compression", _jpeg(10)),
    Shift("resolution x1/2", "camera resolution", _resolution(0.5)),
    Shift("resolution x1/3", "camera resolution", _resolution(1 / 3)),
    Shift("magnification x1.25", "magnification", _magnification(1.25), moderate=True),
    Shift("magnification x0.8", "magnification", _magnification(0.8), moderate=True),
    Shift("magnification x1.5", "magnification", _magnification(1.5)),
    Shift("magnification x0.67", "magnification", _magnification(0.67)),
)

SHIFTS_BY_NAME = {s.name: s for s in SHIFTS}
