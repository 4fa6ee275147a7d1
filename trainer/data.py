"""The training images, decoded once into one uint8 tensor.

The data set is small (2,722 fields of 224x224 = 0.4 GB as uint8), so every image is decoded
exactly once, with the same reader and input policy the application uses, and kept in memory
(on the GPU when training there).  Augmentation then works on whole batches in place, which is
what lets an epoch on a GPU take seconds instead of waiting for a JPEG decoder.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bcc_desk.bundle import InputSpec
from bcc_desk.images import ImageReadError, open_image
from bcc_desk.preprocess import make_transform


@dataclass
class ImageSet:
    """Decoded images (n, 3, size, size) uint8 and their labels (n,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.paths)


def decode_images(data: Path, rel_paths: list[str], labels: list[int], spec: InputSpec, workers: int = 4) -> ImageSet:
    """Decode `rel_paths` under `data` with the application's reader and input policy.

    A file that cannot be read stops training with a one-line error naming it: a model
    silently trained on fewer images than its split says would be a worse surprise."""
    transform = make_transform(spec)

    def load(rel: str) -> torch.Tensor:
        try:
            return transform(open_image(data / rel, reduce_to=round(spec.size / spec.crop_pct)))
        except ImageReadError as exc:
            raise ValueError(f"cannot read training image {rel}: {exc}") from None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        tensors = list(pool.map(load, rel_paths))
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, spec.size, spec.size, dtype=torch.uint8)
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), list(rel_paths))
