"""A lab's small fine-tune (issue #37): about 200 images (50 a class) fine-tuned from the shipped
model with the `finetune` recipe, and where its time goes: training, calibration and export,
int8 and thresholds, the colour check, cross-validation (`fit_seconds` in the bundle's metrics),
beside its cross-validated figures and its verdict.

    python bench/small_finetune.py [--data ../shared/data/all4] [--per-class 50] [--cv K] [--out /tmp/small-ft] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from common import ALL4, REPO, cpu_name, publish


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ALL4)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("/tmp/small-ft"))
    ap.add_argument("--cv", type=int, help="cross-validation folds (default: fit's, 5 under 1,000 images; 0: none)")
    ap.add_argument("--write", action="store_true", help="add the figures to bench/RESULTS.md")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    data = args.out / "data"
    for cls in sorted(p for p in args.data.iterdir() if p.is_dir()):
        (data / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[: args.per_class]:
            (data / cls.name / f.name).hardlink_to(f)
    run = args.out / "run"
    t0 = time.perf_counter()
    cv = [] if args.cv is None else ["--cv", str(args.cv)]
    # A per-user data directory of its own: the int8 package is built afresh, as on a lab's first run.
    env = {**os.environ, "XDG_DATA_HOME": str(args.out / "user-data")}
    proc = subprocess.run([sys.executable, "-m", "trainer", "fit", str(data), "--out", str(run), "--init-bundle",
                           str(REPO / "resources" / "models" / "default"), "--workers", "2", *cv],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 4):
        sys.exit(f"fit failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    seconds = meta["metrics"]["fit_seconds"]
    verdict = meta["verdict"]
    cv = meta["metrics"].get("crossval")
    rows = [f"| {step} | {v:.0f} | {v / seconds['training']:.1f}x |" for step, v in seconds.items()]
    lines = [
        f"### A small fine-tune, {date.today().isoformat()}",
        "",
        f"Machine: {cpu_name()}, 2 cores. {args.per_class * 4} images ({args.per_class} a class of `all4`), "
        "`bcc-train fit DATA --init-bundle resources/models/default` (recipe `finetune`: 5 epochs at 160 px), "
        f"{wall:.0f} s in all (the process, image decoding and the split included).",
        "",
        "| step | seconds | against training |",
        "|---|---:|---:|",
        *rows,
        "",
        *([f"Cross-validated over {cv['folds']} folds of the slides: accuracy {cv['accuracy_mean']:.1%} "
           f"(95% CI over the folds {cv['accuracy_ci'][0]:.1%}-{cv['accuracy_ci'][1]:.1%}); all {cv['images']} images held "
           f"out {cv['pooled_accuracy']:.1%} (Wilson {cv['pooled_accuracy_ci'][0]:.1%}-{cv['pooled_accuracy_ci'][1]:.1%}); "
           f"`crossval.md`:", "", (run / "crossval" / "crossval.md").read_text(encoding="utf-8"), ""] if cv else []),
        f"Verdict: {'fit for use' if verdict['fit_for_use'] else 'not validated: ' + '; '.join(verdict['reasons'])}.",
    ]
    publish("\n".join(lines), args.write, section="## A lab's own model")


if __name__ == "__main__":
    main()
