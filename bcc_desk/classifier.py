"""The one inference engine behind `bcc classify`, `bcc watch` and the desktop app.

Images are decoded in a small thread pool while the network works on the previous batch
(Pillow releases the GIL while decoding), so the model rarely waits for the disk.  Numerics are
the fastest that keep the labels: bf16 autocast on CUDA and on CPUs with native bf16, fp32
elsewhere; static int8 (bcc_desk.quantize) on x86 CPUs for compiled runs of bundles whose
trainer checked int8 against fp32.  A bad image becomes an error record and never stops a run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bcc_desk.bundle import Bundle, BundleError, InputSpec, ood_distance
from bcc_desk.colour import ColourSpec, colour_features
from bcc_desk.devices import autocast, default_batch_size, device_label, pick_device, pick_precision
from bcc_desk.heap import keep_freed_memory
from bcc_desk.images import ImageReadError, open_image
from bcc_desk.prediction import (
    NO_ANSWER,
    REVIEW_COLOUR,
    REVIEW_LOW_CONFIDENCE,
    REVIEW_UNFAMILIAR,
    Prediction,
    error_prediction,
    relative_location,
)
from bcc_desk.preprocess import make_transform, normalise, pad_batch
from bcc_desk.quantize import Int8Unavailable, int8_forward, int8_package_ready
from bcc_desk.review_policy import ReviewPolicy
from bcc_desk.toolchain import compile_blocker, failure_reason, remember_compile_failure

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as progress(done, total) after each batch; total is -1 when not known."""

@dataclass
class _Image:
    """An image as each distinct input policy needs it (uint8 CHW), and its colour statistics."""

    tensors: dict[tuple, torch.Tensor]
    colour: np.ndarray | None
    """None where no bundle carries a colour check."""


_Decoded = _Image | ImageReadError

COMPILE_MIN_IMAGES = 256
"""With compile='auto', a call with at least this many images compiles the network first: the
compilation (seconds when inductor's cache is warm, ~20 s cold on 2 cores) is repaid by ~25%
faster batches.  Smaller calls (a daemon's trickle, a GUI's single image) stay eager."""

def int8_checked(bundle: Bundle) -> bool:
    """The bundle carries an int8 calibration whose check against fp32 passed."""
    return bundle.meta.int8 is not None and bundle.meta.int8.check.get("passed") is True


def _spec_key(spec: InputSpec) -> tuple:
    return (spec.size, spec.crop_pct, spec.interpolation)


@dataclass
class _Member:
    bundle: Bundle
    key: tuple
    forward: Callable | None = None  # compiled or int8; None: the eager network
    model: torch.nn.Module | None = None  # the eager network, once placed on the device
    ood: tuple[torch.Tensor, torch.Tensor, float] | None = None  # means, precision, threshold


TTA_VIEWS = 8


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 label-safe views of a batch of smear fields (n, c, h, w): the four right-angle
    rotations, each also mirrored.  A field has no up or left, so a model's answer averaged over
    them does not depend on how the slide lay under the camera.  The first view is `x` itself
    (the out-of-distribution score is taken on it)."""
    views = [x.rot90(k, dims=(-2, -1)) for k in range(4)]
    return [v.contiguous() for r in views for v in (r, r.flip(-1))]


class Classifier:
    """One or several bundles (an ensemble, probabilities averaged) ready to classify images.

    `review_threshold` overrides the bundles' own (the strictest of them by default).
    `slide_consensus`: `review_policy` flags an image that disagrees with its slide (off: every
    image is judged alone, for folders that mix patients)."""

    def __init__(
        self,
        bundles: Bundle | Sequence[Bundle],
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        tta: bool = False,
        review_threshold: float | None = None,
        slide_consensus: bool = True,
        workers: int = 2,
        channels_last: bool | None = None,
        compile: bool | None = None,
        int8_cache: Path | None = None,
    ) -> None:
        """`batch_size` None picks the device's fastest; `compile` None (auto) compiles the
        network (torch.compile) before a call of `COMPILE_MIN_IMAGES` images or more.
        precision 'int8' runs static int8 (always compiled) from the bundles' checked calibration;
        'auto' does too on x86 CPUs whenever it compiles a bundle that carries one.  Compiled int8
        packages are kept in `int8_cache` (default: the per-user data directory)."""
        members = [bundles] if isinstance(bundles, Bundle) else list(bundles)
        if not members:
            raise BundleError("no model bundle given")
        classes = members[0].classes
        for b in members[1:]:
            if b.classes != classes:
                raise BundleError(
                    f"ensemble members disagree on classes: {b.path} has {b.classes}, "
                    f"{members[0].path} has {classes}"
                )
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if review_threshold is not None and not 0.0 <= review_threshold <= 1.0:
            raise ValueError(f"review threshold must be within 0..1, got {review_threshold}")
        self.device = pick_device(device)
        self.autocast_dtype = pick_precision(self.device, precision)
        if precision == "int8":
            if compile is False:
                raise ValueError("int8 runs compiled: it cannot be combined with --no-compile")
            missing = [b.name for b in members if b.meta.int8 is None]
            if missing:
                raise BundleError(
                    f"model {missing[0]} carries no int8 calibration; add it with: "
                    "bcc-train int8 BUNDLE DATA --split RUN/split.csv (or use another --precision)"
                )
        # Static int8 runs twice as fast as compiled bf16 on x86 CPUs (bench/RESULTS.md) and its
        # labels were checked against fp32 by the trainer: 'auto' takes it wherever the network
        # is compiled and every member's check passed (a check killed midway leaves a calibration
        # marked not passed).  Settled at the first compile, where it may fall back to bf16.
        self.int8 = precision == "int8" or (
            precision == "auto" and compile is not False and self.device.type == "cpu"
            and all(int8_checked(b) for b in members)
        )
        self._int8_requested = precision == "int8"
        self._int8_active = False
        self.int8_cache = int8_cache
        # channels_last pays off on CUDA tensor cores; on CPU it measured no faster (bench/).
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.batch_size = batch_size or default_batch_size(self.device)
        self.compile = compile
        self._answered = False  # whether a batch has given numbers yet
        self.tta = tta
        self.workers = max(1, workers)
        self.classes = members[0].labels  # the names a user reads (bundle.labels), in output order
        # An image that agrees with its slide has its own cut-off (the slide's consensus flags the
        # others); a threshold given by the user holds for every image.
        cut_offs = ReviewPolicy.of_bundles([b.meta for b in members], review_threshold)
        self.review_threshold, self.slide_review_threshold = cut_offs.alone, cut_offs.in_slide
        self.slide_consensus = slide_consensus
        self.bundles = members
        self.name = "+".join(b.name for b in members)
        self.sha256 = "+".join(b.sha256 for b in members)
        self._transforms: dict[tuple, Callable[[Image.Image], torch.Tensor]] = {}
        # The largest size any member resizes to: big JPEGs are decoded straight at that scale.
        self._decode_size = max(round(b.meta.input.size / b.meta.input.crop_pct) for b in members)
        self._members: list[_Member] = []
        # Each member's colour check (an ensemble's members share their training data; the
        # strictest says), on the first member's input: the pixels the trainer profiled.
        self._colour: list[ColourSpec] = [b.meta.colour for b in members if b.meta.colour is not None]
        keep_freed_memory()  # every batch frees and re-allocates the same tens of MB
        # A kept int8 package holds the whole network: then the eager one is not even built
        # (timm's import and the build are seconds of a run's start-up).
        lazy = self.int8 and all(int8_package_ready(b, self.batch_size, self.autocast_dtype, int8_cache)
                                 for b in members)
        for b in members:
            key = _spec_key(b.meta.input)
            self._transforms.setdefault(key, make_transform(b.meta.input))
            ood = None
            if b.ood_stats is not None and b.meta.ood is not None:
                means, inverse_cov = b.ood_stats
                ood = (means.to(self.device), inverse_cov.to(self.device), b.meta.ood.threshold)
            self._members.append(_Member(b, key, ood=ood))
            if not lazy:
                self._eager(self._members[-1])

    def _eager(self, m: _Member) -> torch.nn.Module:
        """The member's eager network on this classifier's device (built on first use)."""
        if m.model is None:
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            m.model = m.bundle.model.to(self.device, memory_format=memory_format).eval()
        return m.model

    @property
    def device_label(self) -> str:
        return device_label(self.device, self.autocast_dtype, self._int8_active)

    @property
    def int8_active(self) -> bool:
        """True once the network runs as static int8 (after the first compiling call)."""
        return self._int8_active

    @property
    def compiled(self) -> bool:
        """True once the network runs compiled (torch.compile or an int8 package)."""
        return any(m.forward is not None for m in self._members)

    # -- decoding -----------------------------------------------------------------------------
    def _decode(self, path: Path) -> _Decoded:
        try:
            image = open_image(path, reduce_to=self._decode_size)
        except ImageReadError as exc:
            return exc
        tensors = {key: tf(image) for key, tf in self._transforms.items()}
        colour = colour_features(tensors[self._members[0].key].numpy()) if self._colour else None
        return _Image(tensors, colour)

    def _decoded(self, paths: Iterable[Path]) -> Generator[tuple[Path, _Decoded], None, None]:
        """(path, decoded tensors or the read error), in order, decoded ahead in a thread pool."""
        lookahead = 2 * self.batch_size
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="bcc-decode")
        pending: deque[tuple[Path, Future]] = deque()
        try:
            for path in paths:
                pending.append((path, pool.submit(self._decode, path)))
                if len(pending) >= lookahead:
                    p, fut = pending.popleft()
                    yield p, fut.result()
            while pending:
                p, fut = pending.popleft()
                yield p, fut.result()
        finally:
            # Also reached when the consumer stops early (GUI cancel): drop what is queued.
            pool.shutdown(wait=True, cancel_futures=True)

    def _decoded_batches(self, paths: Iterable[Path]) -> Generator[list[tuple[Path, _Decoded]], None, None]:
        """Lists of `batch_size` decoded images (the last may be shorter)."""
        decoded = self._decoded(paths)
        try:
            while batch := list(itertools.islice(decoded, self.batch_size)):
                yield batch
        finally:
            decoded.close()

    # -- inference ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _infer(self, tensors: dict[tuple, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities (n, classes) averaged over members and flips, and the
        out-of-distribution ratio (score / threshold, >1 = unfamiliar) or None."""
        probs = None
        ood = None
        for m in self._members:
            forward = m.forward or self._eager(m).forward_with_features
            x = tensors[m.key].to(self.device, non_blocking=True)
            if not self._int8_active:  # the int8 package takes uint8 and normalises inside
                x = normalise(x, m.bundle.meta.input)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            views = tta_views(x) if self.tta else [x]
            for i, view in enumerate(views):
                with autocast(self.device, self.autocast_dtype):
                    logits, features = forward(view)
                if i == 0:
                    _check_outputs(m, logits, features)
                p = torch.softmax(logits.float() / m.bundle.meta.temperature, dim=1)
                probs = p if probs is None else probs + p
                if i == 0 and m.ood is not None:
                    means, precision, threshold = m.ood
                    ratio = ood_distance(features, means, precision) / threshold
                    ood = ratio if ood is None else torch.maximum(ood, ratio)
        assert probs is not None
        probs = probs / (len(self._members) * (TTA_VIEWS if self.tta else 1))
        return probs.cpu(), None if ood is None else ood.cpu()

    def predict_paths(
        self,
        paths: Sequence[Path] | Iterable[Path],
        root: Path,
        progress: ProgressCallback | None = None,
    ) -> Generator[Prediction, None, None]:
        """Classify images under `root`, yielding one Prediction per path, in order."""
        # Absolute, not resolved: a symlinked image is reported where its link sits under ROOT.
        root = Path(os.path.abspath(root))
        paths = [Path(os.path.abspath(p)) for p in paths]
        total = len(paths)
        if self._compiles(total) or self._int8_kept():
            self._compile()
        batches = self._decoded_batches(paths)
        try:
            yield from self._predict_batches(batches, root, total, progress)
        finally:
            batches.close()  # a consumer that stops early (GUI cancel) stops the decoders too

    def _compiles(self, total: int) -> bool:
        """Whether a call of `total` images compiles first (int8 asked for by name always does)."""
        return bool(self.compile or (self.compile is None and (total >= COMPILE_MIN_IMAGES or self._int8_requested)))

    def _int8_kept(self) -> bool:
        """int8 is chosen and already built here: loading it costs less than a batch, so even a
        small call takes it (a small call never builds one: that takes half a minute)."""
        return self.int8 and all(int8_package_ready(m.bundle, self.batch_size, self.autocast_dtype, self.int8_cache)
                                 for m in self._members)

    def preparation(self, total: int) -> str | None:
        """What a call of `total` images does before its first batch, for a progress display
        (None: nothing worth saying)."""
        if self.compiled or not self._compiles(total):
            return None
        if compile_blocker(self.device) is not None:
            return None
        if self.int8 and not self._int8_kept():
            return "preparing int8 for this computer (once, about half a minute)"
        return "compiling the network"

    def _compile(self) -> None:
        """Compile each member once (static shapes: partial batches are padded).  Compilation
        needs a C++ compiler (CPU) or Triton (GPU); where it cannot work the network stays eager,
        said in one warning, and a failure is remembered so that no later run pays for it."""
        if not self._int8_active and not self.compiled and not self._int8_kept():
            blocker = compile_blocker(self.device)
            if blocker is not None:
                log.warning("running uncompiled%s: %s", " and without int8" if self.int8 else "", blocker)
                self.compile, self.int8 = False, False
                return
        if self.int8 and not self._int8_active:
            self._quantize()
        for m in self._members:
            if m.forward is not None:
                continue
            compiled = torch.compile(self._eager(m).forward_with_features, dynamic=False)
            probe = torch.zeros(self.batch_size, 3, m.bundle.meta.input.size, m.bundle.meta.input.size,
                                device=self.device)
            if self.channels_last:
                probe = probe.contiguous(memory_format=torch.channels_last)
            try:
                with torch.inference_mode(), autocast(self.device, self.autocast_dtype):
                    compiled(probe)
            except Exception as exc:  # noqa: BLE001 - no compiler, unsupported op, ...: eager still works
                reason = failure_reason(exc)
                remember_compile_failure(self.device, reason)
                log.warning("running uncompiled: torch.compile failed here (%s); later runs will not try again", reason)
                self.compile = False
                return
            m.forward = compiled

    def _quantize(self) -> None:
        """Static int8 for every member, or none (an ensemble runs at one precision)."""
        compiled = []
        try:
            for m in self._members:
                compiled.append(int8_forward(m.bundle, self.batch_size, self.autocast_dtype, self.int8_cache))
        except Int8Unavailable as exc:
            # Asked for: the user must know.  Picked by 'auto': bf16 is the documented fallback.
            (log.warning if self._int8_requested else log.info)("int8 is not available (%s); running %s",
                                                                exc, "bf16" if self.autocast_dtype else "fp32")
            self.int8 = False
            return
        for m, forward in zip(self._members, compiled):
            m.forward = forward
        self._int8_active = True

    def _predict_batches(
        self,
        batches: Iterator[list[tuple[Path, _Decoded]]],
        root: Path,
        total: int,
        progress: ProgressCallback | None,
    ) -> Iterator[Prediction]:
        done = 0
        for batch in batches:
            good = [(p, r) for p, r in batch if not isinstance(r, ImageReadError)]
            results: dict[Path, Prediction] = {}
            if good:
                stacked = {key: torch.stack([r.tensors[key] for _, r in good]) for key in self._transforms}
                if self.compiled and len(good) < self.batch_size:
                    # A compiled network has one static shape: pad, and ignore the padding.
                    stacked = {k: pad_batch(v, self.batch_size) for k, v in stacked.items()}
                if self.device.type == "cuda":
                    stacked = {k: v.pin_memory() for k, v in stacked.items()}
                probs, ood = self._infer(stacked)
                for i, (p, r) in enumerate(good):
                    results[p] = self._record(p, root, probs[i], None if ood is None else float(ood[i]),
                                              self._colour_ratio(r.colour))
                # A network whose first batch is all NaN is broken, not the images (later, one
                # such image is an error row: a daemon never stops on one file).
                if not self._answered and all(results[p].error == NO_ANSWER for p, _ in good):
                    raise BundleError(f"{self.name} gives no usable answer (its outputs are not numbers) on the first "
                                      f"{len(good)} images: its weights or bundle.json are damaged; retrain or re-export it")
                self._answered = True
            for p, outcome in batch:
                if isinstance(outcome, ImageReadError):
                    yield error_prediction(p, root, str(outcome), self.name, self.sha256)
                else:
                    yield results[p]
            done += len(batch)
            if progress is not None:
                progress(done, total)

    @property
    def review_policy(self) -> ReviewPolicy:
        """How this run's predictions are flagged once their slides are known (`ReviewPolicy.apply`)."""
        return ReviewPolicy(self.review_threshold, self.slide_review_threshold if self.slide_consensus else None)

    def _colour_ratio(self, features: np.ndarray | None) -> float | None:
        """The image's colour distance over the cut-off (>1: unlike training); None without a check."""
        return None if features is None else max(c.ratio(features) for c in self._colour)

    def _record(self, path: Path, root: Path, probs: torch.Tensor, ood_ratio: float | None,
                colour_ratio: float | None = None) -> Prediction:
        values = probs.tolist()
        if not all(math.isfinite(v) for v in values):  # damaged weights: an error row, never a label
            return error_prediction(path, root, NO_ANSWER, self.name, self.sha256)
        order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
        top, runner_up = values[order[0]], values[order[1]]
        reasons = []
        if top < self.review_threshold or self.review_threshold >= 1.0:  # 1.0: the model flags every image
            reasons.append(REVIEW_LOW_CONFIDENCE)
        if ood_ratio is not None and ood_ratio > 1.0:
            reasons.append(REVIEW_UNFAMILIAR)
        if colour_ratio is not None and colour_ratio > 1.0:
            reasons.append(REVIEW_COLOUR)
        file, slide = relative_location(path, root)
        return Prediction(
            path=path,
            file=file,
            slide=slide,
            label=self.classes[order[0]],
            confidence=top,
            margin=top - runner_up,
            probabilities=dict(zip(self.classes, values)),
            needs_review=bool(reasons),
            review_reason="; ".join(reasons),
            error=None,
            model=self.name,
            model_sha256=self.sha256,
            ood_score=ood_ratio,
            colour_score=colour_ratio,
        )


def _check_outputs(m: _Member, logits: torch.Tensor, features: torch.Tensor | None) -> None:
    """The network that ran (built, compiled or a kept int8 package) gives what the bundle
    declares: one output per class, and the features its out-of-distribution statistics were
    taken on.  A package planted under another bundle's key would otherwise label every image
    under the wrong names."""
    meta = m.bundle.meta
    if logits.shape[-1] != len(meta.classes):
        raise BundleError(f"{m.bundle.name}: its network gives {logits.shape[-1]} outputs for the {len(meta.classes)} "
                          "classes bundle.json declares")
    if m.ood is not None and (features is None or features.shape[-1] != m.ood[0].shape[-1]):
        raise BundleError(f"{m.bundle.name}: its network's features do not fit its out-of-distribution statistics")
