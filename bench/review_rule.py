"""Does the review rule keep its promise on images it was not chosen on?  Validation alone answers.

    python bench/review_rule.py BUNDLE DATA --split SPLIT.csv [--member BUNDLE]... [--tta]
                                [--precision fp32|int8] [--draws 2000] [--out MD]

The application's own predictions on the split's validation images (`bcc classify`'s classifier),
then `trainer.metrics.review_rule_on_halves` for the plain rule (the lowest cut-off at which the
kept images were 99% right), with one error more assumed, and with the slide's consensus too (the
split's groups as slides: an image that disagrees with its group is flagged and the cut-off is
chosen among the rest, never below even odds for the trainer's rule): half the groups choose the
cut-off, the other half is flagged with it, `--draws` times.  No test image is read.
`--member` adds bundles to an ensemble with BUNDLE (probabilities averaged, as `bcc classify -m A
-m B` runs it), `--tta` averages the 8 views.  Prints a markdown table (and writes it to --out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bcc_desk.bundle import read_meta
from bcc_desk.slides import disagrees_with_slide
from trainer.metrics import choose_review_threshold, review_rule_on_halves, slide_floor
from trainer.review_threshold import app_predictions, validation_truth
from trainer.split import Split

from common import print_table, validation_study_parser

# name: (errors assumed, the slide's consensus flags too and the cut-off is chosen on the rest,
#        the trainer's floor under that cut-off)
RULES = {"plain (99% on validation)": (0, False, False), "one error assumed (the trainer's rule before 18)": (1, False, False),
         "one error assumed, the slide's consensus (rule 18)": (1, True, False),
         "rule 18, never below even odds (the trainer's rule)": (1, True, True)}


def main() -> None:
    ap = validation_study_parser(__doc__)
    ap.add_argument("--member", type=Path, action="append", default=[], help="another bundle: an ensemble")
    ap.add_argument("--tta", action="store_true", help="test-time augmentation (8 views)")
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()

    split = Split.load(args.split, args.data)
    meta = read_meta(args.bundle)
    predictions = app_predictions([args.bundle, *args.member], [args.data / p for p in split.paths("val")],
                                  args.data, args.precision, workers=2, tta=args.tta)
    truth = validation_truth(split, meta)
    conf = np.array([p.confidence for p in predictions])
    right = np.array([p.label == t for p, t in zip(predictions, truth)])
    unfamiliar = np.array([p.ood_score is not None and p.ood_score > 1 for p in predictions])
    groups = np.array(split.groups("val"))
    # The split's groups (ten neighbouring file numbers) stand in for slides: no patient ids.
    disagrees = np.array(disagrees_with_slide(groups.tolist(), [p.label for p in predictions]))

    name = "+".join(read_meta(b).name for b in [args.bundle, *args.member]) + (" with TTA" if args.tta else "")
    lines = [
        f"Review rule of `{name}` on validation ({len(truth)} images, {int((~right).sum())} wrong, "
        f"{int(unfamiliar.sum())} unfamiliar; {args.precision}); held-out halves: {args.draws} draws of half "
        f"the {np.unique(groups).size} groups.",
        "",
        "| rule | cut-off on all of validation | flagged there | held-out half short of 99% | "
        "median unflagged right | median flagged (90th centile) |",
        "|---|---|---|---|---|---|",
    ]
    halves = {}
    for name, (assumed, consensus, floored) in RULES.items():
        # the rule as recipe.md's studies were made with it (a model short of the target flags its least confident quarter)
        floor = slide_floor(choose_review_threshold(conf, right, when_short="least confident")) if floored else 0.0
        other = unfamiliar | disagrees if consensus else unfamiliar
        choose = ~other if consensus else np.ones_like(right)
        t = max(floor, choose_review_threshold(conf[choose], right[choose], assumed_errors=assumed, when_short="least confident"))
        flagged = float(((conf < t) | other).mean())
        h = review_rule_on_halves(conf, right, other, groups, assumed_errors=assumed, draws=args.draws,
                                  choose_among_unflagged=consensus, floor=floor)
        lines.append(f"| {name} | {t:.4f} | {flagged:.1%} | {h['short_of_target']:.0%} | "
                     f"{h['median_unflagged_right']:.2%} | {h['median_flagged']:.1%} ({h['p90_flagged']:.1%}) |")
        halves[name] = h
    lines.append(f"\n{int(disagrees.sum())} images disagree with their slide (group), "
                 f"{int((disagrees & ~right).sum())} of them wrong; {int((~right & ~disagrees).sum())} wrong ones agree.")
    lines.append(f"\nValidation accuracy {right.mean():.2%}.")
    paths = split.paths("val")
    for group, held_out, otherwise in halves[list(RULES)[-1]]["deciding_groups"]:  # the trainer's rule
        # Errors cluster in a slide: say which group of images decides the shortfall, and its errors.
        members = [i for i, g in enumerate(groups) if g == group]
        wrong = [f"{Path(paths[i]).name} as {predictions[i].label} ({conf[i]:.3f})" for i in members if not right[i]]
        lines.append(f"Group {group} ({Path(paths[members[0]]).name} … {Path(paths[members[-1]]).name}, "
                     f"{len(members)} images) decides the trainer's rule: short on {held_out:.0%} of the halves "
                     f"that hold it out, {otherwise:.0%} of the others; wrong there: {'; '.join(wrong) or 'none'}.")
    print_table(lines, args.out)


if __name__ == "__main__":
    main()
