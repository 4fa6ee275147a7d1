"""`bcc-train`: fit and evaluate models for bcc-desk (also `python -m trainer`, and under torchrun)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from bcc_desk.cli_help import DEVICE_CHOICES, Command
from bcc_desk.logs import quiet_developer_noise
from trainer.recipes import RECIPES

app = typer.Typer(
    name="bcc-train",
    help="Train, calibrate and evaluate B-ALL classifiers; writes model bundles for bcc-desk.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, markup=False)  # paths may hold brackets: never rich markup


# The options of the commands that judge bundles on labelled images (evaluate, compare).
SplitToJudge = Annotated[
    Optional[Path], typer.Option(help="RUN/split.csv: use its --part (default: every image in DATA).")
]
PartToJudge = Annotated[str, typer.Option(help="Which part of the split: test, val or train.")]
Device = Annotated[str, typer.Option(metavar=DEVICE_CHOICES)]
TTA = Annotated[bool, typer.Option("--tta", help="Test-time augmentation: the 8 right-angle rotations and mirror images.")]


def say_error(message: str) -> None:
    console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    say_error(message)
    raise typer.Exit(code)


def _check_ood_dir(ood_dir: Path | None) -> None:
    """Refused before any work: a wrong --ood-dir would otherwise surface only after training."""
    if ood_dir is not None and not ood_dir.is_dir():
        fail(f"--ood-dir: {ood_dir} is not a folder")


@app.callback()
def _root() -> None:
    quiet_developer_noise()
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("bcc-train")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False))


@app.command(cls=Command)
def fit(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: split, history, checkpoints, bundle/.")],
    recipe: Annotated[
        Optional[str], typer.Option(help=f"A named preset ({', '.join(RECIPES)}); the options below override it.")
    ] = None,
    arch: Annotated[Optional[str], typer.Option(help="Any timm architecture name. (default convnext_tiny)")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="[default: 25]")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=2, help="Per process. (default 32)")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate (after warm-up). (default 5e-4)")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="[default: 0.05]")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw or adam (the study's). (default adamw)")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", min=0.0, help="[default: 1]")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=16, help="[default: 224]")] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(metavar=DEVICE_CHOICES, help="auto picks cuda, then mps, then cpu.")] = "auto",
    precision: Annotated[str, typer.Option(metavar="auto|fp32|bf16|fp16", help="auto: bf16 where the hardware has it.")] = "auto",
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 4,
    pretrained: Annotated[
        bool, typer.Option("--pretrained/--no-pretrained", help="Start from timm's ImageNet weights (downloads).")
    ] = False,
    init_weights: Annotated[
        Optional[Path], typer.Option("--init-weights", help="A local timm weights file to start from (offline labs).")
    ] = None,
    init_bundle: Annotated[
        Optional[Path],
        typer.Option("--init-bundle", help="Fine-tune this bundle (its classes and head, its size unless --image-size; recipe finetune)."),
    ] = None,
    split: Annotated[
        Optional[Path], typer.Option(help="Reuse a split.csv from an earlier run (images added since become new groups).")
    ] = None,
    ood_dir: Annotated[
        Optional[Path], typer.Option("--ood-dir", help="Images unlike the training data, to report the OOD flag rate.")
    ] = None,
    hidden: Annotated[Optional[int], typer.Option(help="Width of the head's hidden layer (0: none). (default 256)")] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.9, help="[default: 0.3]")] = None,
    drop_path: Annotated[Optional[float], typer.Option("--drop-path", min=0.0, max=0.9, help="[default: 0.1]")] = None,
    label_smoothing: Annotated[
        Optional[float], typer.Option("--label-smoothing", min=0.0, max=0.5, help="[default: 0]")
    ] = None,
    ema_decay: Annotated[
        Optional[float], typer.Option("--ema-decay", min=0.0, max=0.99999, help="EMA of the weights per step, 0 off. (default 0)")
    ] = None,
    balance: Annotated[
        Optional[str], typer.Option(help="sampler (classes drawn equally), loss (weighted), none. (default none)")
    ] = None,
    stain: Annotated[Optional[float], typer.Option(min=0.0, max=0.5, help="HED stain jitter strength. (default 0)")] = None,
    colour: Annotated[
        Optional[float],
        typer.Option(min=0.0, max=2.0, help="Colour augmentation (hue, white balance, greyscale); 1: recipe colour's. (default 0)"),
    ] = None,
    jpeg: Annotated[
        Optional[float],
        typer.Option(min=0.0, max=1.0, help="Share of training images JPEG-compressed at quality 15-60, as a camera's "
                                            "export or an archive does. (default 0)"),
    ] = None,
    channels: Annotated[
        Optional[str],
        typer.Option(help="What the network sees: rgb; hue-free (no hue: brightest and darkest channel, standardised); "
                          "hue-sat-free (no hue or saturation: darkest channel and chroma, each standardised). (default rgb)"),
    ] = None,
    zoom: Annotated[
        Optional[str],
        typer.Option(help="Random zoom range MIN,MAX (below 1: cells smaller, as at a lower magnification). (default 1,1.15)"),
    ] = None,
    mixup: Annotated[Optional[float], typer.Option(min=0.0, help="Mixup alpha, 0 off. (default 0)")] = None,
    cutmix: Annotated[Optional[float], typer.Option(min=0.0, help="CutMix alpha, 0 off. (default 0)")] = None,
    trivial_augment: Annotated[
        Optional[bool], typer.Option("--trivial-augment/--no-trivial-augment", help="TrivialAugmentWide per image. (default off)")
    ] = None,
    size_schedule: Annotated[
        Optional[str], typer.Option(
            "--size-schedule",
            help="Training sizes by epoch, e.g. 96@1,112@31 (default: the recipe's with its own size, else --image-size throughout).",
        )
    ] = None,
    weights_dtype: Annotated[str, typer.Option("--weights-dtype", help="float16 or float32 in the bundle.")] = "float16",
    limit_per_class: Annotated[
        Optional[int], typer.Option("--limit-per-class", min=1, help="Train on the first N images per class (trials).")
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default: bcc-ARCH-DATE).")] = None,
    int8: Annotated[
        bool, typer.Option("--int8/--no-int8", help="Add checked static int8 for x86 CPUs (see `bcc-train int8`).")
    ] = True,
    shift_table: Annotated[
        bool, typer.Option("--shift-table/--no-shift-table",
                           help="Choose the colour check's cut-off under every shift of validation and record the shift "
                                "table (minutes on a CPU; without it: `bcc-train colour-check` later).")
    ] = True,
    allow_resize: Annotated[
        bool, typer.Option("--allow-resize", help="Fine-tune at another --image-size than the parent bundle's.")
    ] = False,
    keep_checkpoint: Annotated[
        bool, typer.Option("--keep-checkpoint", help="Keep OUT/last.pt whole (default: its optimizer state is dropped at the end).")
    ] = False,
    cv: Annotated[
        Optional[int],
        typer.Option("--cv", min=0, max=20, help="Also cross-validate over K folds of the slides (0: not). Default: 5 under 1,000 images."),
    ] = None,
) -> None:
    """Split DATA (grouped, stratified 70/15/15), train, calibrate, and write OUT/bundle.

    Interrupted (Ctrl+C, a restart), the same command resumes from OUT/last.pt."""
    from trainer.config import FitConfig, FitError
    from trainer.fit import fit as run_fit
    from trainer.recipes import fit_settings

    if not data.is_dir():
        fail(f"{data} is not a folder")
    _check_ood_dir(ood_dir)
    if cv == 1:
        fail("--cv: 0 (no cross-validation) or at least 2 folds")
    if sum(map(bool, (pretrained, init_weights, init_bundle))) > 1:
        fail("--pretrained, --init-weights and --init-bundle exclude each other")
    given = {
        "arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "optimizer": optimizer, "warmup_epochs": warmup_epochs, "image_size": image_size, "dropout": dropout,
        "drop_path": drop_path, "label_smoothing": label_smoothing, "ema_decay": ema_decay, "balance": balance,
        "stain": stain, "colour": colour, "jpeg": jpeg, "channels": channels, "mixup": mixup, "cutmix": cutmix,
        "trivial_augment": trivial_augment,
        "hidden": None if hidden is None else ([hidden] if hidden else []),
        "size_schedule": size_schedule, "zoom": zoom,
    }
    try:
        settings = fit_settings(recipe or ("finetune" if init_bundle else None), given, init_bundle=init_bundle,
                                allow_resize=allow_resize)
    except ValueError as exc:
        fail(str(exc))
    if weights_dtype not in ("float16", "float32", "bfloat16"):
        fail("--weights-dtype must be float16, bfloat16 or float32")
    cfg = FitConfig(
        data=data.resolve(), out=out.resolve(), seed=seed, device=device, precision=precision, workers=workers,
        init="pretrained" if pretrained else (str(init_weights) if init_weights else "none"),
        split=split, ood_dir=ood_dir.resolve() if ood_dir else None,
        weights_dtype=weights_dtype, name=name, limit_per_class=limit_per_class, int8=int8, keep_checkpoint=keep_checkpoint,
        cv_folds=cv, shift_table=shift_table,
        recipe=recipe or ("finetune" if init_bundle else None), init_bundle=init_bundle.resolve() if init_bundle else None,
        **settings,
    )
    try:
        bundle = run_fit(cfg)
    except (FitError, ValueError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; run the same command again to resume from {cfg.out / 'last.pt'}", code=130)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"bundle: {bundle}")
        _end_with_verdict(bundle)


def _end_with_verdict(bundle: Path) -> None:
    """Say the bundle's verdict last, and exit 4 when it is not validated.  Not under torchrun:
    it reports any exit code but 0 as its own crash, with a traceback; the WARNING block says it."""
    from bcc_desk.bundle import read_meta

    verdict = read_meta(bundle).verdict
    if verdict is not None:
        say_verdict(verdict)
        if not verdict.fit_for_use and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise typer.Exit(EXIT_NOT_VALIDATED)


@app.command("import-reviews", cls=Command)
def import_reviews(
    workbooks: Annotated[
        list[Path],
        typer.Argument(help="Review workbooks (.xlsx): bcc-desk's export, or a bcc classify report edited.", show_default=False),
    ],
    into: Annotated[Path, typer.Option("--into", help="The data folder (one sub-folder per class) to add the images to.")],
    images: Annotated[
        Optional[Path], typer.Option(help="Where the reviewed images are now (default: the root on the workbook's Run sheet).")
    ] = None,
) -> None:
    """Add every image a person labelled to DATA/<class>/ and to DATA/reviews.csv.

    Rows without a reviewer label are skipped; an image already imported is not added again; the
    originals are only read.  Any bad row stops the import before anything is copied."""
    from trainer.manifest import MANIFEST, ReviewImportError
    from trainer.reviews import import_reviews as run_import

    try:
        summary = run_import(list(workbooks), into, images=images)
    except ReviewImportError as exc:
        fail(str(exc))
    for cls in sorted(set(summary.added) | set(summary.already)):
        typer.echo(
            f"{cls}: {summary.added[cls]} added ({summary.corrections[cls]} corrected the model, "
            f"{summary.added[cls] - summary.corrections[cls]} confirmed it)"
            + (f", {summary.already[cls]} already there" if summary.already[cls] else "")
        )
    typer.echo(
        f"{summary.total_added} images added to {into} from {summary.workbooks} workbook(s); "
        f"{summary.unreviewed} rows without a reviewer label skipped; manifest: {into / MANIFEST}"
    )


@app.command(cls=Command)
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder.", show_default=False)],
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class.", show_default=False)],
    split: SplitToJudge = None,
    part: PartToJudge = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for metrics.json, tables and plots.")] = None,
    device: Device = "auto",
    tta: TTA = False,
    record: Annotated[
        bool, typer.Option("--record", help="Also store the headline figures in the bundle (shown by `bcc info`).")
    ] = False,
) -> None:
    """Accuracy, per-class precision/recall/F1 next to the study's, calibration, plots."""
    from bcc_desk.bundle import BundleError, record_metrics
    from trainer.evaluate import Judged, evaluate as run_evaluate, summary_metrics

    try:
        result = run_evaluate(bundle, Judged(data, split, part, device, tta), out=out)
        if record:
            record_metrics(bundle, summary_metrics(result.metrics))
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot record the figures in {bundle} ({exc.strerror or exc})")
    typer.echo(result.markdown)
    typer.echo(f"written: {result.folder}" + (f"; figures recorded in {bundle}" if record else ""))


@app.command(cls=Command)
def int8(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder (changed in place).", show_default=False)],
    data: Annotated[Path, typer.Argument(help="The data folder the bundle was trained on.", show_default=False)],
    split: Annotated[Path, typer.Option(help="RUN/split.csv of that training run.")],
    images: Annotated[int, typer.Option(min=8, help="Validation images stored for calibration.")] = 64,
    seed: int = 0,
    ood_dir: Annotated[
        Optional[Path], typer.Option("--ood-dir", help="Images from another lab: measure the chosen out-of-distribution check.")
    ] = None,
) -> None:
    """Add static int8 (about 2x bf16 on x86 CPUs) to BUNDLE, checked against fp32 on validation;
    the review and out-of-distribution thresholds are chosen again so that their promises hold
    for both."""
    import torch

    from bcc_desk.bundle import BundleError, read_meta
    from bcc_desk.quantize import int8_unavailable_reason
    from trainer.int8 import add_int8

    if reason := int8_unavailable_reason(torch.device("cpu")):
        fail(reason)
    _check_ood_dir(ood_dir)
    try:
        check = add_int8(bundle, data, split, images=images, seed=seed, ood_dir=ood_dir)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    meta = read_meta(bundle)
    typer.echo(
        f"int8 added to {bundle}: on {check['images']} validation images it agrees with fp32 on "
        f"{check['label_agreement']:.1%} of labels (changed ones all flagged for review: "
        f"{'yes' if check['changed_labels_all_flagged'] else 'no'}), {check['review_agreement']:.1%} of review "
        f"flags and {check['ood_agreement']:.1%} of out-of-distribution flags; confidence moved by at most "
        f"{check['max_confidence_change']:.3f}; review threshold now {meta.review_threshold:.3f}"
        + (f", out-of-distribution threshold {meta.ood.threshold:.1f}" if meta.ood else "")
        + " (the stricter of fp32's and int8's on validation)"
    )


@app.command("colour-check", cls=Command)
def colour_check(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder (changed in place).", show_default=False)],
    data: Annotated[Path, typer.Argument(help="The data folder the bundle was trained on.", show_default=False)],
    split: Annotated[Path, typer.Option(help="RUN/split.csv of that training run.")],
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 2,
) -> None:
    """Give BUNDLE the colour check (`fit` does it for every new model): the training images'
    colour profile, and a cut-off chosen on validation under every stain, hue, white-balance,
    focus and magnification shift so that the images it leaves unflagged stay 99% right."""
    from bcc_desk.bundle import BundleError, read_meta
    from trainer.colour_check import add_colour_check

    try:
        table = add_colour_check(bundle, data, split, workers=workers)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    meta = read_meta(bundle)
    worst = min(table, key=lambda k: table[k]["unflagged_accuracy"])
    typer.echo(
        f"colour check added to {bundle}: it flags {meta.metrics['val_flagged_colour']:.1%} of validation; under "
        f"{len(table) - 1} shifts the unflagged images are at worst {table[worst]['unflagged_accuracy']:.1%} right ({worst})"
        + (f"; the promise breaks under {', '.join(meta.metrics['shift_promise_broken'])}"
           if meta.metrics.get("shift_promise_broken") else "")
    )


EXIT_NOT_VALIDATED = 4


def say_verdict(verdict) -> None:
    """The verdict's last lines: a WARNING block a data person cannot miss when it is not fit."""
    if verdict.fit_for_use:
        typer.echo(f"verdict: fit for use ({verdict.rule})")
        return
    lines = ["WARNING: this model is NOT VALIDATED, and bcc classify, bcc watch and bcc-desk will run it only with",
             "--allow-unvalidated (every report page then says so). Why:", *(f"  - {r}" for r in verdict.reasons),
             f"The rule: {verdict.rule}."]
    console.print(Text("\n".join(lines), style="bold yellow"), highlight=False, soft_wrap=True)


@app.command(cls=Command, epilog="Exit codes: 0 fit for use; 2 a usage error; 4 not validated (the bundle records why).")
def verdict(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder (its verdict is recorded in it).", show_default=False)],
    data: Annotated[Path, typer.Argument(help="The data folder the bundle was trained on.", show_default=False)],
    split: Annotated[Path, typer.Option(help="RUN/split.csv of that training run.")],
) -> None:
    """Judge BUNDLE by its validation figures and record the verdict in it: fit for use, or not
    validated with the reasons (`fit` and `ensemble` do it for every model they write)."""
    from bcc_desk.bundle import BundleError
    from trainer.split import Split
    from trainer.verdict import judge_bundle

    try:
        result = judge_bundle(bundle, Split.load(split, data))
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    say_verdict(result)
    if not result.fit_for_use:
        raise typer.Exit(EXIT_NOT_VALIDATED)


@app.command(cls=Command)
def ensemble(
    members: Annotated[list[Path], typer.Argument(help="Two or more bundle folders, trained on the same split.", show_default=False)],
    data: Annotated[Path, typer.Option(help="The data folder they were trained on.", show_default=False)],
    split: Annotated[Path, typer.Option(help="RUN/split.csv of their training (the same for all).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the ensemble's bundle.", show_default=False)],
    name: Annotated[Optional[str], typer.Option(help="The model's name (default: the members' joined by '+').")] = None,
    ood_dir: Annotated[
        Optional[Path], typer.Option("--ood-dir", help="Images from another lab: measure the chosen out-of-distribution check.")
    ] = None,
    int8: Annotated[bool, typer.Option(help="Add static int8 (x86 CPUs), checked against fp32 on validation.")] = True,
) -> None:
    """Pack MEMBERS into one bundle that averages their calibrated probabilities, with its own
    temperature, review and out-of-distribution thresholds chosen on validation (the members' own
    are each for one network alone)."""
    from bcc_desk.bundle import BundleError, read_meta
    from trainer.ensemble import build_ensemble

    _check_ood_dir(ood_dir)
    try:
        build_ensemble(members, out, data, split, name=name, ood_dir=ood_dir, int8=int8)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    meta = read_meta(out)
    m = meta.metrics
    typer.echo(
        f"ensemble {meta.name} written to {out}: on validation {m['val_accuracy']:.1%} right, "
        f"review threshold {meta.review_threshold:.3f} (flags {m.get('val_flagged_low_confidence', 0):.1%})"
        + (f", int8 {'added' if meta.int8 else 'not added'}" if int8 else "")
    )
    _end_with_verdict(out)


@app.command(cls=Command)
def samples(
    data: Annotated[Path, typer.Argument(help="The data folder the split was made from.", show_default=False)],
    split: Annotated[Path, typer.Option(help="RUN/split.csv: the samples come from its test part.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of sample sub-folders, one per class.")],
    per_class: Annotated[int, typer.Option("--per-class", min=1)] = 3,
    seed: int = 0,
) -> None:
    """Draw sample images at random (fixed seed) from a split's test part, one folder per class."""
    from trainer.samples import draw_samples

    try:
        copies = draw_samples(data, split, out, per_class=per_class, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"{len(copies)} sample images in {out}")


@app.command(cls=Command)
def compare(
    bundle_a: Annotated[Path, typer.Argument(help="The model in use now (A).", show_default=False)],
    bundle_b: Annotated[Path, typer.Argument(help="The model you may switch to (B).", show_default=False)],
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class.", show_default=False)],
    split: SplitToJudge = None,
    part: PartToJudge = "test",
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Folder for compare.md and compare.json (default: ./compare-A-vs-B, by model name)."),
    ] = None,
    device: Device = "auto",
    tta: TTA = False,
) -> None:
    """Both models on the same images, as bcc-desk runs them: per-class figures side by side, the
    images they label differently, McNemar's exact test of the accuracy difference, calibration
    and review-rate changes."""
    from bcc_desk.bundle import BundleError
    from trainer.compare import compare as run_compare
    from trainer.evaluate import Judged

    try:
        result = run_compare(bundle_a, bundle_b, Judged(data, split, part, device, tta), out=out)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    typer.echo(result.markdown)
    typer.echo(f"written: {result.folder}")


# The modules of the `train` extra (pyproject.toml): without them only training commands fail.
TRAIN_EXTRA = {"imagehash": "imagehash", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "scipy": "scikit-learn"}


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in TRAIN_EXTRA:
            raise
        # The app installs without the trainer's libraries; say how to add them, not a traceback.
        say_error(f"bcc-train needs {TRAIN_EXTRA[missing]}, part of the training extra: "
                  'pip install -e ".[train]" (in a checkout) or pip install "bcc-desk[train]"')
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
