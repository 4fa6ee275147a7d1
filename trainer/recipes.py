"""Named training recipes for `bcc-train fit --recipe NAME`.

A recipe is a set of `FitConfig` settings; any option given on the command line overrides it, and
the bundle's provenance records the recipe's name with the settings actually used.  The evidence
behind each is in docs/default-model/recipe.md: only the validation split chose them.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # The published study's recipe (ConvNeXt Tiny, Adam, cross-entropy, 25 epochs, flips/rotation/
    # brightness), minus its ImageNet initialisation, which these machines cannot download.
    "study": {
        "image_size": 224, "epochs": 25, "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0,
        "label_smoothing": 0.0, "ema_decay": 0.0, "balance": "none", "stain": 0.0,
    },
    # The shipped model's (v4, recipe.md run 11): from scratch on a 2-core CPU in 91 minutes.  The
    # first 40 epochs at 112 px (about 53 s each) so that many epochs fit, the last 30 at the
    # 160 px it is validated and shipped at (about 98 s each); EMA of the weights (decay for ~60
    # steps an epoch), Benign oversampled to a quarter of each epoch, stain jitter.
    "cpu": {
        "image_size": 160, "size_schedule": [(1, 112), (41, 160)], "epochs": 70, "batch_size": 32,
        "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 3.0, "label_smoothing": 0.1,
        "drop_path": 0.1, "ema_decay": 0.998, "balance": "sampler", "stain": 0.05,
    },
    # The same recipe at the network's full resolution for a CUDA GPU, with more epochs: on a
    # data-centre GPU an epoch takes about a second.  Not yet run (no GPU lent so far).
    "gpu": {
        "image_size": 224, "epochs": 200, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3,
        "weight_decay": 0.05, "warmup_epochs": 10.0, "label_smoothing": 0.1, "drop_path": 0.1,
        "ema_decay": 0.999, "balance": "sampler", "stain": 0.05,
    },
    # Fine-tuning a bundle (`--init-bundle`) on a lab's reviewed images added to its data: a short
    # schedule at a tenth of the learning rate, so the model adapts without forgetting; no EMA
    # (too few steps for it to converge).  The network and head come from the parent, and its input
    # size unless `--image-size` gives another (a resolution step, run 9 in recipe.md).
    "finetune": {
        "epochs": 5, "batch_size": 32, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05,
        "warmup_epochs": 0.5, "label_smoothing": 0.1, "drop_path": 0.1, "ema_decay": 0.0,
        "balance": "sampler", "stain": 0.05,
    },
    # The `cpu` recipe with the `colour` augmentation from the first epoch (not yet run; what
    # recipe.md's colour finding points to after run 19): about 2 h 10 min on a 2-core AMD EPYC.
    "cpu-colour": {
        "image_size": 160, "size_schedule": [(1, 112), (41, 160)], "epochs": 70, "batch_size": 32,
        "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 3.0, "label_smoothing": 0.1,
        "drop_path": 0.1, "ema_decay": 0.998, "balance": "sampler", "stain": 0.1, "colour": 1.0, "zoom": (0.8, 1.25),
    },
    # Colour robustness (recipe.md run 19, not shipped): a bundle (`--init-bundle`) fine-tuned at its own
    # size under strong colour augmentation (hue +-25 degrees, saturation x0.5-1.5, white balance,
    # HED stain 0.1, a tenth of the images greyscale, a fifth defocused) and magnification
    # x0.8-1.25, so that colour no longer names the class (bench/shift.py); the kept epoch is the
    # best on unshifted and colour-shifted validation together.
    "colour": {
        "epochs": 10, "batch_size": 32, "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.05,
        "warmup_epochs": 1.0, "label_smoothing": 0.1, "drop_path": 0.1, "ema_decay": 0.0,
        "balance": "sampler", "stain": 0.1, "colour": 1.0, "zoom": (0.8, 1.25),
    },
}


def recipe_settings(name: str | None) -> dict[str, Any]:
    """The settings of recipe `name` (None: none); an unknown name is a one-line error."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return dict(RECIPES[name])
