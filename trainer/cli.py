"""`bcc-train`: fit and evaluate models for bcc-desk (also `python -m trainer`, and under torchrun)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    name="bcc-train",
    help="Train, calibrate and evaluate B-ALL classifiers; writes model bundles for bcc-desk.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def _root() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("bcc-train")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False))


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: split, history, checkpoints, bundle/.")],
    arch: Annotated[str, typer.Option(help="Any timm architecture name.")] = "convnext_tiny",
    epochs: Annotated[int, typer.Option(min=1)] = 25,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Per process.")] = 32,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (after warm-up).")] = 5e-4,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 0.05,
    optimizer: Annotated[str, typer.Option(help="adamw or adam (the study's).")] = "adamw",
    image_size: Annotated[int, typer.Option("--image-size", min=16)] = 224,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 where native), fp32, bf16, fp16.")] = "auto",
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 4,
    pretrained: Annotated[
        bool, typer.Option("--pretrained/--no-pretrained", help="Start from timm's ImageNet weights (downloads).")
    ] = False,
    init_weights: Annotated[
        Optional[Path], typer.Option("--init-weights", help="A local timm weights file to start from (offline labs).")
    ] = None,
    split: Annotated[Optional[Path], typer.Option(help="Reuse a split.csv from an earlier run.")] = None,
    ood_dir: Annotated[
        Optional[Path], typer.Option("--ood-dir", help="Images unlike the training data, to report the OOD flag rate.")
    ] = None,
    hidden: Annotated[int, typer.Option(help="Width of the head's hidden layer (0: none).")] = 256,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.3,
    drop_path: Annotated[float, typer.Option("--drop-path", min=0.0, max=0.9)] = 0.1,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", min=0.0, max=0.5)] = 0.0,
    weights_dtype: Annotated[str, typer.Option("--weights-dtype", help="float16 or float32 in the bundle.")] = "float16",
    limit_per_class: Annotated[
        Optional[int], typer.Option("--limit-per-class", min=1, help="Train on the first N images per class (trials).")
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default: bcc-ARCH-DATE).")] = None,
    int8: Annotated[
        bool, typer.Option("--int8/--no-int8", help="Add checked static int8 for x86 CPUs (see `bcc-train int8`).")
    ] = True,
) -> None:
    """Split DATA (grouped, stratified 70/15/15), train, calibrate, and write OUT/bundle."""
    from trainer.fit import FitConfig, FitError
    from trainer.fit import fit as run_fit

    if not data.is_dir():
        fail(f"{data} is not a folder")
    if pretrained and init_weights:
        fail("--pretrained and --init-weights exclude each other")
    if optimizer not in ("adam", "adamw"):
        fail(f"--optimizer must be adam or adamw, not {optimizer!r}")
    if weights_dtype not in ("float16", "float32", "bfloat16"):
        fail("--weights-dtype must be float16, bfloat16 or float32")
    cfg = FitConfig(
        data=data.resolve(), out=out.resolve(), arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, optimizer=optimizer, image_size=image_size, seed=seed, device=device,
        precision=precision, workers=workers,
        init="pretrained" if pretrained else (str(init_weights) if init_weights else "none"),
        split=split, ood_dir=ood_dir.resolve() if ood_dir else None, hidden=[hidden] if hidden else [],
        dropout=dropout, drop_path=drop_path,
        label_smoothing=label_smoothing, weights_dtype=weights_dtype, name=name, limit_per_class=limit_per_class,
        int8=int8,
    )
    try:
        bundle = run_fit(cfg)
    except (FitError, ValueError) as exc:
        fail(str(exc))
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"bundle: {bundle}")


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder.", show_default=False)],
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class.", show_default=False)],
    split: Annotated[
        Optional[Path], typer.Option(help="RUN/split.csv: evaluate its test part (default: every image in DATA).")
    ] = None,
    part: Annotated[str, typer.Option(help="Which part of the split: test, val or train.")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for metrics.json, tables and plots.")] = None,
    device: str = "auto",
    tta: Annotated[bool, typer.Option("--tta", help="Flip test-time augmentation.")] = False,
) -> None:
    """Accuracy, per-class precision/recall/F1 next to the study's, calibration, plots."""
    from bcc_desk.bundle import BundleError
    from trainer.evaluate import evaluate as run_evaluate

    try:
        result = run_evaluate(bundle, data, split=split, part=part, out=out, device=device, tta=tta)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    typer.echo(result.markdown)
    typer.echo(f"written: {result.folder}")


@app.command()
def int8(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder (changed in place).", show_default=False)],
    data: Annotated[Path, typer.Argument(help="The data folder the bundle was trained on.", show_default=False)],
    split: Annotated[Path, typer.Option(help="RUN/split.csv of that training run.")],
    images: Annotated[int, typer.Option(min=8, help="Validation images stored for calibration.")] = 64,
    seed: int = 0,
) -> None:
    """Add static int8 (about 2x bf16 on x86 CPUs) to BUNDLE, checked against fp32 on validation."""
    import torch

    from bcc_desk.bundle import BundleError
    from bcc_desk.quantize import int8_unavailable_reason
    from trainer.int8 import add_int8

    if reason := int8_unavailable_reason(torch.device("cpu")):
        fail(reason)
    try:
        check = add_int8(bundle, data, split, images=images, seed=seed)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    typer.echo(
        f"int8 added to {bundle}: on {check['images']} validation images it agrees with fp32 on "
        f"{check['label_agreement']:.1%} of labels (changed ones all flagged for review: "
        f"{'yes' if check['changed_labels_all_flagged'] else 'no'}), {check['review_agreement']:.1%} of review "
        f"flags and {check['ood_agreement']:.1%} of out-of-distribution flags; confidence moved by at most "
        f"{check['max_confidence_change']:.3f}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
