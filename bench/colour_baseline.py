"""How much of the label does a field's background colour alone give away?  Validation alone answers.

    python bench/colour_baseline.py DATA --split SPLIT.csv [--k 5] [--bundle BUNDLE] [--out MD]

Each image is reduced to three numbers, its median red, green and blue (the background: plasma
and red cells cover most of a field), and each validation image takes the majority class of its
`k` nearest training images in that colour.  If this reads far above chance, the classes were
photographed or stained apart, a network can lean on that, and figures on this split say less
about a lab whose smears look different (the out-of-distribution check is the guard there).
With `--bundle`, the model's accuracy (fp32) where colour alone is right and where it is wrong,
and how many of its errors there follow the colour.  No test image is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.split import Split

from common import print_table


def median_colour(path: Path) -> np.ndarray:
    """Median RGB of the image, read at an eighth of its size (JPEG draft: fast, same median)."""
    with Image.open(path) as im:
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        return np.median(np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3), axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--bundle", type=Path, help="also: is this model right where colour misleads?")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    args = ap.parse_args()
    split = Split.load(args.split, args.data)
    parts = {s: (np.stack([median_colour(args.data / p) for p in split.paths(s)]), np.array(split.labels(s)))
             for s in ("train", "val")}
    (xt, yt), (xv, yv) = parts["train"], parts["val"]
    nearest = np.argsort(((xv[:, None, :] - xt[None, :, :]) ** 2).sum(-1), axis=1)[:, : args.k]
    n = len(split.classes)
    guess = np.array([np.bincount(yt[row], minlength=n).argmax() for row in nearest])
    lines = [
        f"Background colour alone ({args.k} nearest training images by median RGB) on the {len(yv)} validation "
        f"images of `{args.data.name}`: **{(guess == yv).mean():.1%} right**, where always naming the commonest "
        f"class gives {np.bincount(yv, minlength=n).max() / len(yv):.1%}.",
        "",
        "| class | validation images | recall from colour alone | median RGB (validation) |",
        "|---|---:|---:|---|",
    ]
    for c, name in enumerate(split.classes):
        mine = yv == c
        rgb = ", ".join(f"{v:.0f}" for v in np.median(xv[mine], axis=0)) if mine.any() else "-"
        recall = f"{(guess[mine] == c).mean():.1%}" if mine.any() else "-"
        lines.append(f"| {name} | {int(mine.sum())} | {recall} | {rgb} |")
    if args.bundle:
        lines += ["", _model_where_colour_misleads(args.bundle, args.data, split, guess == yv, guess)]
    print_table(lines, args.out)


def _model_where_colour_misleads(bundle: Path, data: Path, split: Split, colour_right: np.ndarray,
                                 colour_guess: np.ndarray) -> str:
    from bcc_desk.bundle import read_meta
    from trainer.review_threshold import app_predictions, validation_truth

    meta = read_meta(bundle)
    predictions = app_predictions(bundle, [data / p for p in split.paths("val")], data, "fp32", workers=2)
    truth = validation_truth(split, meta)
    right = np.array([p.label == t for p, t in zip(predictions, truth)])
    # A model error "follows the colour" when it names the class the colour pointed to.
    follows = sum(not right[i] and meta.class_index(split.classes[colour_guess[i]]) == meta.labels.index(p.label)
                  for i, p in enumerate(predictions) if not colour_right[i] and p.label is not None)
    misled = ~colour_right
    return (f"`{meta.name}` (fp32) is right on {right[colour_right].mean():.1%} of the {int(colour_right.sum())} "
            f"images where colour alone is right and {right[misled].mean():.1%} of the {int(misled.sum())} where it "
            f"is wrong; {follows} of its {int((~right[misled]).sum())} errors there name the class the colour points to.")


if __name__ == "__main__":
    main()
