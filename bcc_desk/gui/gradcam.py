"""Where the model looked: a Grad-CAM heat map for one image (the `grad-cam` library).

Pure torch/numpy (no Qt): the image pane runs it on a pool thread and colours the result.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bcc_desk.bundle import BundleNet, InputSpec

_lock = threading.Lock()  # grad-cam hooks the network: one computation per network at a time


@dataclass(frozen=True)
class CamResult:
    heatmap: np.ndarray
    """(size, size) float32 in 0..1, over the model's input (the centre crop of the image)."""
    box: tuple[float, float, float, float]
    """(left, top, width, height) of that crop in the original image's pixels."""
    target: int
    """Index of the class the map explains."""


def target_layer(model: BundleNet) -> torch.nn.Module:
    """The last feature stage of the trunk: the coarsest map that still has a spatial layout."""
    trunk = model.trunk
    for name in ("stages", "layers", "blocks", "features"):
        seq = getattr(trunk, name, None)
        if isinstance(seq, torch.nn.Sequential | torch.nn.ModuleList) and len(seq):
            return seq[-1]
    raise ValueError(f"no spatial feature stage found in {type(trunk).__name__} for Grad-CAM")


def crop_box(width: int, height: int, spec: InputSpec) -> tuple[float, float, float, float]:
    """The part of a width x height image the network sees (resize shorter side, centre crop)."""
    resize = round(spec.size / spec.crop_pct)
    scale = min(width, height) / resize  # original pixels per resized pixel
    side = spec.size * scale
    box_w, box_h = min(side, width), min(side, height)
    return (width - box_w) / 2, (height - box_h) / 2, box_w, box_h


def gradcam(model: BundleNet, spec: InputSpec, image: Image.Image, target: int | None = None) -> CamResult:
    """Grad-CAM of `target` (default: the predicted class) for an RGB image."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise RuntimeError("Grad-CAM needs the grad-cam package (pip install grad-cam)") from None

    from bcc_desk.preprocess import make_transform, normalise

    x = normalise(make_transform(spec)(image).unsqueeze(0), spec)
    x = x.to(next(model.parameters()).device)
    with _lock, torch.enable_grad():
        if target is None:
            with torch.no_grad():
                target = int(model(x).argmax(dim=1).item())
        with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
    heat = np.nan_to_num(heat.astype(np.float32), nan=0.0)
    return CamResult(heatmap=heat, box=crop_box(image.width, image.height, spec), target=target)
