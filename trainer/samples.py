"""`bcc-train samples`: the sample images shipped in resources/samples, drawn at random.

Drawn from the **test** part of a run's split with a fixed seed, never chosen by any model's
answers, so `bcc classify resources/samples` shows a fair picture of the shipped model.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from bcc_desk.bundle import display_name
from bcc_desk.images import discover_images
from trainer.split import Split


def draw_samples(data: Path, split_csv: Path, out: Path, per_class: int = 3, seed: int = 0) -> list[Path]:
    """Copy `per_class` test images of every class into out/<class display name>/ (the name the
    model's reports use), replacing the images there (other files, such as a README, stay);
    returns the copies."""
    split = Split.load(split_csv, data)
    rng = random.Random(seed)
    test = list(zip(split.paths("test"), split.labels("test")))
    copies = []
    for i, cls in enumerate(split.classes):
        pool = sorted(p for p, y in test if y == i)
        if len(pool) < per_class:
            raise ValueError(f"the test split has only {len(pool)} images of {cls}")
        folder = out / display_name(cls)
        folder.mkdir(parents=True, exist_ok=True)
        for old in discover_images(folder):
            old.unlink()
        for rel in sorted(rng.sample(pool, per_class)):
            copies.append(Path(shutil.copy2(data / rel, folder / Path(rel).name)))
    return copies
