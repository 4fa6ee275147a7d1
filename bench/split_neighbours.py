"""Does the grouped split leak?  Validation accuracy by how close each image's group sits to training.

    python bench/split_neighbours.py BUNDLE DATA --split SPLIT.csv [--precision fp32|int8] [--out MD]

The split keeps each block of `NEIGHBOUR_WINDOW` neighbouring file numbers (and every perceptual
near-duplicate) on one side, but the public names carry no patient id, so one patient's fields can
span several blocks, some in training and some in validation.  If that leaked, a model would be
more accurate on validation images whose neighbouring blocks (the block before and after, same
folder and series) were trained on than on those whose neighbours were not.  This prints the
application's validation accuracy (`bcc classify`'s classifier) for each case: 0, 1 or 2 of the
two neighbouring blocks in training.  No test image is read.
"""

from __future__ import annotations

from collections import defaultdict

from bcc_desk.bundle import read_meta
from trainer.grouping import number_block
from trainer.review_threshold import app_predictions, validation_truth
from trainer.split import Split

from common import print_table, validation_study_parser


def main() -> None:
    args = validation_study_parser(__doc__).parse_args()

    split = Split.load(args.split, args.data)
    part_of_block = {number_block(r.path): r.split for r in split.rows}
    paths = split.paths("val")
    predictions = app_predictions(args.bundle, [args.data / p for p in paths], args.data, args.precision, workers=2)
    truth = validation_truth(split, read_meta(args.bundle))
    right: dict[str, list[bool]] = defaultdict(list)
    for path, p, t in zip(paths, predictions, truth):
        key = number_block(path)
        if key is None:
            right["no file number"].append(p.label == t)
            continue
        folder, series, block = key
        near = sum(part_of_block.get((folder, series, block + d)) == "train" for d in (-1, 1))
        right[f"{near} of 2"].append(p.label == t)

    lines = [f"Validation accuracy of `{read_meta(args.bundle).name}` ({args.precision}) by how many of each image's "
             "two neighbouring number blocks were trained on:", "",
             "| neighbouring blocks in training | images | right | accuracy |", "|---|---:|---:|---:|"]
    for case in sorted(right):
        ok = right[case]
        lines.append(f"| {case} | {len(ok)} | {sum(ok)} | {sum(ok) / len(ok):.1%} |")
    print_table(lines, args.out)


if __name__ == "__main__":
    main()
