"""`bcc`: the command line.  It parses, reports progress and prints; the work is in the core.

Exit codes: 0 the run completed (unreadable images are listed in the report), 1 nothing could be
classified, 2 a usage error (bad option, missing folder, unusable model bundle), 3 the run
completed but its report went to a fallback folder (its own could not take it), 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import shlex
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from bcc_desk import __version__
from bcc_desk.cli_help import DEVICE_CHOICES, PRECISION_CHOICES, Command
from bcc_desk.logs import quiet_developer_noise
from bcc_desk.paths import DEFAULT_MODEL_DIR

if TYPE_CHECKING:
    from bcc_desk.options import RunSpec

app = typer.Typer(
    name="bcc",
    help="Classify B-ALL blood smear images (Benign, early Pre-B, Pre-B, Pro-B) into an Excel report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No rich markup in anything printed: paths and folder names may hold brackets ("[b] smear").
console = Console(stderr=True, markup=False)
out_console = Console(markup=False)

EXIT_NOTHING, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # and 0: the run completed
EXIT_ELSEWHERE = 3  # the run completed, but its report is in a fallback folder, not where asked
SLIDE_CONSENSUS = typer.Option(
    "--slide-consensus/--no-slide-consensus",
    help="Flag an image whose label differs from most of its slide folder's (a folder holds one patient's slide). "
         "Turn off where a folder mixes patients.")

PDF_OPTION = typer.Option("--pdf", help="Also write the PDF report (a page per slide: verdict, counts, the flagged fields) beside it.")
LAB_NAME = typer.Option("--lab-name", envvar="BCC_LAB_NAME", help="The lab's name for the PDF's header.")
ALLOW_UNVALIDATED = typer.Option(
    "--allow-unvalidated",
    help="Run a model its trainer did not find fit for use (bcc info shows the verdict); every report page says so.")
# The RunSpec's flags, declared once for classify and watch; `_run_spec` reads them by the names of
# ClassifierOptions' fields, so a new option is its field, its flag here, and its line in each signature.
MODEL = typer.Option("--model", "-m", metavar="BUNDLE", help="Model bundle folder; repeat for an ensemble. Default: the shipped model.")
DEVICE = typer.Option(metavar=DEVICE_CHOICES, help="auto picks cuda, then mps, then cpu.")
PRECISION = typer.Option(metavar=PRECISION_CHOICES, help="auto: the fastest that keeps the labels.")
BATCH_SIZE = typer.Option("--batch-size", "-b", min=1, max=4096, help="Images per batch. Default: 8 on CPU, 64 on GPU.")
TTA = typer.Option("--tta", help="Average over the 8 right-angle rotations and mirror images (8x slower).")
REVIEW_THRESHOLD = typer.Option(min=0.0, max=1.0, help="Flag images whose confidence is below this. Default: the model's.")
WORKERS = typer.Option(min=1, max=64, help="Image decoding threads.")

_report_written = False
"""Set once `classify` has its report on disk: what is left of the process is only teardown."""


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr and the exit code; no traceback for a user's mistake."""
    console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"bcc-desk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    # Warnings of the core (a locked report, ...) reach the user on stderr, one line each.
    quiet_developer_noise()
    logger = logging.getLogger("bcc_desk")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False))


def _run_spec(ctx: typer.Context) -> RunSpec:
    """The command's model folders (`--model`, else the shipped model) and its ClassifierOptions,
    from its parameters of the same names."""
    from bcc_desk.options import ClassifierOptions, RunSpec

    models = ctx.params.get("model") or []
    if not models and not (DEFAULT_MODEL_DIR / "bundle.json").is_file():
        fail(f"no default model is installed at {DEFAULT_MODEL_DIR}; pass --model BUNDLE, or train one with: "
             "bcc-train fit DATA --out RUN")
    options = ClassifierOptions(**{f.name: ctx.params[f.name] for f in fields(ClassifierOptions) if f.name in ctx.params})
    return RunSpec(tuple(models or [DEFAULT_MODEL_DIR]), options)


@app.command(
    cls=Command,
    epilog=("Exit codes: 0 done; 1 nothing could be classified; 2 a usage error; 3 done, but the report's folder "
            "could not take it (full, read-only, gone) and it is in a fallback folder, which the last line names; "
            "130 interrupted (the report holds the images done)."),
)
def classify(
    ctx: typer.Context,
    root: Annotated[Path, typer.Argument(help="Folder of slide folders (or one image).", show_default=False)],
    model: Annotated[Optional[list[Path]], MODEL] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Report file: .xlsx, .csv or .pdf. Default: ROOT/bcc-report.xlsx (.csv with --csv)."),
    ] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Write a plain CSV of the image rows instead of Excel.")] = False,
    pdf: Annotated[bool, PDF_OPTION] = False,
    lab_name: Annotated[str, LAB_NAME] = "",
    allow_unvalidated: Annotated[bool, ALLOW_UNVALIDATED] = False,
    device: Annotated[str, DEVICE] = "auto",
    precision: Annotated[str, PRECISION] = "auto",
    batch_size: Annotated[Optional[int], BATCH_SIZE] = None,
    tta: Annotated[bool, TTA] = False,
    review_threshold: Annotated[Optional[float], REVIEW_THRESHOLD] = None,
    slide_consensus: Annotated[bool, SLIDE_CONSENSUS] = True,
    workers: Annotated[int, WORKERS] = 2,
    compile: Annotated[
        Optional[bool],
        typer.Option(
            "--compile/--no-compile",
            help="Compile the network first: seconds of set-up, ~25% faster batches. Default: for 256 images or more.",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table.")] = False,
) -> None:
    """Classify every image under ROOT (one folder per slide) and write the report."""
    from bcc_desk.bundle import BundleError
    from bcc_desk.colour import colour_advice
    from bcc_desk.images import discover_images
    from bcc_desk.lab_records import LabRecords, SlidesFileError, read_slides_csv
    from bcc_desk.prediction import relative_location
    from bcc_desk.report_file import ReportError
    from bcc_desk.report_target import REPORT_SUFFIXES, write_somewhere
    from bcc_desk.run_record import run_info

    started = datetime.now(timezone.utc)
    if not root.exists():
        fail(f"{root} does not exist")
    if not (root.is_dir() or root.is_file()):  # never opened: a pipe would block, a device stream
        fail(f"{root} is neither a folder nor an image file")
    if out is not None and out.suffix.lower() not in REPORT_SUFFIXES:
        fail(f"--out {out.name}: a report is .xlsx, .csv or .pdf")
    if csv and out is not None and out.suffix.lower() != ".csv":
        fail(f"--csv writes a .csv, not {out.name}")
    root = root.resolve()
    folder = root if root.is_dir() else root.parent
    try:  # a bad slides.csv is said now, not after an hour of classifying
        lab = LabRecords(identities=read_slides_csv(folder), lab_name=lab_name)
    except SlidesFileError as exc:
        fail(str(exc))
    paths = discover_images(root)
    out = (out or folder / ("bcc-report.csv" if csv else "bcc-report.xlsx")).resolve()
    targets = [out] + ([out.with_suffix(".pdf")] if pdf and out.suffix.lower() != ".pdf" else [])
    if not out.parent.is_dir():
        fail(f"the report's folder {out.parent} does not exist")
    try:  # find out now, not after an hour of classifying, that the report cannot be written
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as exc:
        fail(f"cannot write the report in {out.parent} ({exc.strerror or exc}); choose another place with --out")
    spec = _run_spec(ctx)
    if quiet:  # nothing but errors, for this command only (a caller's logging is left as it was)
        logger = logging.getLogger("bcc_desk")
        ctx.call_on_close(lambda level=logger.level: logger.setLevel(level))
        logger.setLevel(logging.ERROR)
    try:
        classifier = spec.build()
    except (ValueError, BundleError) as exc:
        fail(str(exc))

    if not paths:
        fail(f"no images found under {root} (looked for .jpg .jpeg .png .tif .tiff .bmp)", EXIT_NOTHING)

    predictions: list = []
    interrupted = False
    stopped = _sigterm_as_ctrl_c()
    try:
        _run(classifier, paths, folder, quiet, predictions)
    except BundleError as exc:  # a damaged network: its first images gave no number
        fail(str(exc))
    except KeyboardInterrupt:
        interrupted = True
        console.print(Text.assemble(("interrupted", "yellow"), f": writing the report for the {len(predictions)} images done"))
    finally:
        stopped()

    predictions = classifier.review_policy.apply(predictions)  # a slide's consensus needs all of its images
    done = {p.path for p in predictions}
    run = run_info(classifier, root=folder, command=shlex.join(["bcc", *sys.argv[1:]]), started=started,
                   finished=datetime.now(timezone.utc),
                   not_classified=[relative_location(path, folder)[0] for path in paths if path not in done])
    written_all, diverted = [], None
    report_log, level = logging.getLogger("bcc_desk.report"), logging.getLogger("bcc_desk.report").level
    report_log.setLevel(logging.ERROR)  # its warning of a locked target: the line below says it once
    try:
        for target in targets:
            try:  # a full disk or a folder gone meanwhile sends the report to a fallback folder
                written, why = write_somewhere(predictions, target, run, lab=lab)
            except ReportError as exc:
                fail(f"{exc}; choose another place with --out", EXIT_NOTHING)
            written_all.append(written)
            diverted = diverted or why
    finally:
        report_log.setLevel(level)
    written = written_all[0]
    global _report_written
    _report_written = True
    if not quiet:
        out_console.print(summary_table(predictions, classifier.classes))
    classified = sum(p.ok for p in predictions)
    flagged = sum(p.needs_review for p in predictions)
    if not quiet:
        out_console.print(
            f"{classified} of {len(paths)} images classified, {flagged} flagged for review "
            f"({len(predictions) - classified} of them unreadable). Report: {', '.join(map(str, written_all))}",
            highlight=False,
            soft_wrap=True,
        )
    if advice := colour_advice(predictions):  # said even with --quiet: every label of the run is in doubt
        console.print(Text.assemble(("colours unlike training:", "bold yellow"), f" {advice}"), highlight=False, soft_wrap=True)
    if diverted:  # said even with --quiet: the report is not where a script will look for it
        console.print(Text.assemble(("warning:", "bold yellow"), f" {diverted}; the report is in {written}"),
                      highlight=False, soft_wrap=True)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if classified == 0:
        fail("no image could be classified (see the error column of the report)", EXIT_NOTHING)
    if diverted:
        raise typer.Exit(EXIT_ELSEWHERE)


def _sigterm_as_ctrl_c() -> Callable[[], None]:
    """Until the returned function is called, SIGTERM (what a service manager or `kill` sends)
    stops a run as Ctrl+C does: the report of the images done is written, exit code 130."""
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread (an embedding program): its own handling stays
        return lambda: None

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _run(classifier, paths: list[Path], root: Path, quiet: bool, predictions: list) -> None:
    """Classify into `predictions` (filled in place so an interrupt keeps what is done)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # The first large run on a computer builds int8 for half a minute before its first batch:
    # the bar says so instead of sitting at 0.
    preparing = classifier.preparation(len(paths))
    if preparing and not quiet and not console.is_terminal:  # no bar in a log file: one line
        console.print(preparing, highlight=False)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=True,
    ) as bar:
        task = bar.add_task(preparing or "classifying", total=len(paths))
        for prediction in classifier.predict_paths(
            paths, root, progress=lambda done, total: bar.update(task, completed=done, description="classifying")
        ):
            predictions.append(prediction)


def summary_table(predictions, classes: list[str]) -> Table:
    """Per slide: images, counts per class, flagged, unreadable, and the slide's verdict under
    its row (the closing screen)."""
    from rich import box

    from bcc_desk.slides import count_slides
    from bcc_desk.verdict import DECISION_AID, slide_verdict

    # Fits an 80-column console with the four class names whole (no borders between columns).
    table = Table(title="Slides", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("slide", overflow="fold", ratio=1)
    for name in ["images", *classes, "flagged", "unreadable"]:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for slide, count in count_slides(predictions).items():  # slide-2 before slide-10, as the report
        table.add_row(
            slide, str(count.images), *(str(count.per_class.get(c, 0)) for c in classes),
            str(count.flagged), str(count.unreadable),
        )
        verdict = slide_verdict(count)
        table.add_row(Text(f"  {verdict.text}", style="yellow" if verdict.to_review else "green"), *[""] * (len(classes) + 3))
        if count.note:  # a slide unlike training says so once, under its row
            table.add_row(Text(f"  {count.note}", style="yellow"), *[""] * (len(classes) + 3))
    table.caption = DECISION_AID
    return table


@app.command(cls=Command)
def info(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder.", show_default=False)],
) -> None:
    """Show a model bundle's metadata and its validation (and, where recorded, test) figures."""
    from bcc_desk.bundle import BundleError, load_bundle
    from bcc_desk.bundle_meta import describe, format_value

    try:
        meta = load_bundle(bundle).meta
    except BundleError as exc:
        fail(str(exc))
    table = Table(title=f"Model bundle {bundle}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = describe(meta) + [(f"metric: {k}", format_value(v)) for k, v in meta.metrics.items()]
    for row in rows:
        table.add_row(*row)
    out_console.print(table)


@app.command(cls=Command)
def watch(
    ctx: typer.Context,
    root: Annotated[Path, typer.Argument(help="Folder to watch (one sub-folder per slide).", show_default=False)],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report (.xlsx, .csv or .pdf), kept up to date. Default: ROOT/bcc-report.xlsx.")
    ] = None,
    pdf: Annotated[bool, PDF_OPTION] = False,
    lab_name: Annotated[str, LAB_NAME] = "",
    allow_unvalidated: Annotated[bool, ALLOW_UNVALIDATED] = False,
    model: Annotated[list[Path] | None, MODEL] = None,
    state: Annotated[
        Path | None,
        typer.Option(help="Ledger file (SQLite); the log is written beside it. Default: per ROOT in the user data folder."),
    ] = None,
    polling: Annotated[
        bool, typer.Option("--polling", help="Poll the folder instead of system events (network shares: SMB, NFS).")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between polls with --polling.")] = 1.0,
    settle: Annotated[
        float,
        typer.Option(min=0.05, help="Seconds a file must stay unchanged to count as complete, where the system does not report closes."),
    ] = 2.0,
    device: Annotated[str, DEVICE] = "auto",
    precision: Annotated[str, PRECISION] = "auto",
    batch_size: Annotated[int | None, BATCH_SIZE] = None,
    tta: Annotated[bool, TTA] = False,
    review_threshold: Annotated[float | None, REVIEW_THRESHOLD] = None,
    slide_consensus: Annotated[bool, SLIDE_CONSENSUS] = True,
    workers: Annotated[int, WORKERS] = 2,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile",
            help="Compile the network at start (seconds, ~20 s the first time): faster batches, int8 where the model allows.",
        ),
    ] = True,
) -> None:
    """Classify every image that lands under ROOT, exactly once, until Ctrl+C or SIGTERM."""
    import signal

    from bcc_desk.bundle import BundleError
    from bcc_desk.run_record import run_info
    from bcc_desk.watch.ledger import LedgerError, storage_fault
    from bcc_desk.watch.site import ReportFolderError, WatchError, WatchTiming, claim_watch, log_file, log_to_file
    from bcc_desk.watch.watcher import make_watcher

    try:  # before a model is loaded: a service must say so at start, not in a week
        site = claim_watch(root, out, state)  # holds the state's lock as long as it lives
    except ReportFolderError as exc:
        fail(f"{exc}; choose another place with --out")
    except WatchError as exc:
        fail(str(exc))
    log_to_file(log_file(site.state))
    # Compiled once at start (the watcher does it before it says ready), not by call size: a
    # burst arrives file by file, so its calls rarely reach classify's threshold.
    spec = _run_spec(ctx)
    try:
        classifier = spec.build()
        single = spec.options.for_single_images().build(classifier.bundles) if compile else None
    except (ValueError, BundleError) as exc:
        fail(str(exc))
    try:
        record = run_info(classifier, root=site.root, command=shlex.join(["bcc", *sys.argv[1:]]))
        watcher = make_watcher(site, classifier, record, single=single,
                               timing=WatchTiming(polling=polling, interval=interval, settle=settle), pdf=pdf, lab_name=lab_name)
    except LedgerError as exc:
        fail(str(exc))
    except sqlite3.OperationalError as exc:  # a running watch waits this out; at start there is nothing to wait for
        if (reason := storage_fault(exc)) is None:
            raise
        fail(f"the ledger {site.state} cannot be written ({reason})", EXIT_NOTHING)

    def stop(signum: int, frame: object) -> None:
        watcher.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C stops at once

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
    try:
        watcher.run()
    except (WatchError, BundleError) as exc:  # BundleError: a damaged network, found on the sample image
        fail(str(exc))
    except Exception:
        logging.getLogger("bcc_desk.watch").exception("the watch stopped on an unexpected error")
        raise typer.Exit(EXIT_NOTHING) from None
    finally:
        site.release()


def main() -> None:
    """The console entry point (`bcc`, `python -m bcc_desk`)."""
    try:
        app()
    except SystemExit as done:
        if _report_written and "torch._inductor" not in sys.modules and not isinstance(done.code, str):
            _exit_now(done.code or 0)
        raise


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown, once everything is written.

    That teardown frees torch's objects one by one: about a second on a 2-core machine after a
    run whose report is already on disk.  Only taken when nothing is left to finish: streams
    and log handlers are flushed here, and a run that compiled (torch._inductor imported, with
    its worker processes and exit hooks) exits the normal way."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
