"""Named training recipes for `bcc-train fit --recipe NAME`.

A recipe is a set of `FitConfig` settings; any option given on the command line overrides it, and
the bundle's provenance records the recipe's name with the settings actually used.  The evidence
behind each is in docs/default-model/recipe.md: only the validation split chose them.
"""

from __future__ import annotations

import logging
from pathlib import Path
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


def fit_settings(recipe: str | None, given: dict[str, Any], *, init_bundle: Path | None = None,
                 allow_resize: bool = False) -> dict[str, Any]:
    """`recipe`'s settings (a fine-tune's parent's over them), with the options the user `given`
    (None: not given) over both; `size_schedule` and `zoom` as typed (`96@1,112@31`, `0.8,1.25`).
    Raises ValueError with the one line a user reads for a value that cannot be used."""
    from bcc_desk.bundle_meta import INPUT_CHANNELS
    from trainer.model_init import parent_settings
    from trainer.schedule import parse_size_schedule, parse_zoom

    settings = recipe_settings(recipe)
    if init_bundle:
        settings.update(parent_settings(init_bundle))
    image_size = given.get("image_size")
    if init_bundle and image_size is not None and image_size != settings["image_size"]:
        if not allow_resize:  # a lab's small fine-tune at another size quietly loses what the parent learned
            raise ValueError(f"--image-size {image_size}: {init_bundle.name} works at {settings['image_size']} px; "
                             "fine-tuning at another size needs --allow-resize (recipe.md run 9 stepped a model up "
                             "that way, on the whole data set)")
        logging.getLogger("bcc-train").warning(
            "fine-tuning at %d px a model trained at %d px (--allow-resize): judge it by its verdict and a comparison",
            image_size, settings["image_size"])
    typed = {k: given.get(k) for k in ("size_schedule", "zoom")}
    settings.update({k: v for k, v in given.items() if v is not None and k not in typed})
    if image_size is not None and typed["size_schedule"] is None:
        # A recipe's schedule leads up to the recipe's own size: another --image-size trains at
        # that size throughout unless a schedule is given with it.
        settings.pop("size_schedule", None)
    if typed["size_schedule"] is not None:
        settings["size_schedule"] = parse_size_schedule(typed["size_schedule"])
    if typed["zoom"] is not None:
        settings["zoom"] = parse_zoom(typed["zoom"])
    if settings.get("optimizer", "adamw") not in ("adam", "adamw"):
        raise ValueError(f"--optimizer must be adam or adamw, not {settings['optimizer']!r}")
    if settings.get("balance", "none") not in ("sampler", "loss", "none"):
        raise ValueError(f"--balance must be sampler, loss or none, not {settings['balance']!r}")
    if settings.get("channels", "rgb") not in INPUT_CHANNELS:
        raise ValueError(f"--channels must be {', '.join(INPUT_CHANNELS[:-1])} or {INPUT_CHANNELS[-1]}, "
                         f"not {settings['channels']!r}")
    return settings
