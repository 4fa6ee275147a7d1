"""The model bundle: the one contract between the trainer and the application.

A bundle is a folder holding `bundle.json` (what the network is and how to feed it) and
`model.safetensors` (its weights).  Weights are only ever read with safetensors, so opening a
bundle someone hands us cannot run code; the sha256 and every tensor shape are checked before the
model is used, and each failure says in one line which file is wrong and how.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file
from torch import nn

from bcc_desk.bundle_meta import (  # the torch-free half of the contract, re-exported here
    CALIBRATION_FILE as CALIBRATION_FILE,
    FORMAT_VERSION as FORMAT_VERSION,
    IMAGENET_MEAN as IMAGENET_MEAN,
    IMAGENET_STD as IMAGENET_STD,
    INTERPOLATIONS as INTERPOLATIONS,
    META_FILE as META_FILE,
    OOD_FEATURES as OOD_FEATURES,
    WEIGHTS_FILE as WEIGHTS_FILE,
    BundleError as BundleError,
    BundleMeta as BundleMeta,
    HeadSpec as HeadSpec,
    InputSpec as InputSpec,
    Int8Spec as Int8Spec,
    OODSpec as OODSpec,
    Verdict as Verdict,
    bundle_fingerprint as bundle_fingerprint,
    display_name as display_name,
    read_meta as read_meta,
)
from bcc_desk.colour import ColourSpec
from bcc_desk.files import atomic_write, file_sha256, write_text_atomic
from bcc_desk.messages import one_line


class _OODCheck(nn.Module):
    """The out-of-distribution statistics as buffers, so the weights' sha256 covers them."""

    num_features: int

    def _add_ood(self, meta: BundleMeta) -> None:
        self.ood_features = meta.ood.features if meta.ood is not None else "pooled"
        if meta.ood is not None:
            d, k = self.num_features, len(meta.classes)
            self.register_buffer("ood_means", torch.zeros(k, d))
            self.register_buffer("ood_precision", torch.zeros(d, d))

    @property
    def has_ood(self) -> bool:
        return hasattr(self, "ood_means")

    def ood_score(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean, per row."""
        return ood_distance(features, self.ood_means, self.ood_precision)


class BundleNet(_OODCheck):
    """A timm trunk (pooled features) + the bundle's head + optional OOD statistics.

    One module for training and inference, so the trainer's state dict is exactly what the
    application loads."""

    def __init__(self, meta: BundleMeta, pretrained: bool = False, **timm_kwargs: Any) -> None:
        super().__init__()
        import timm  # imported here: timm's import is slow and `bcc --help` should not pay for it

        self.trunk = timm.create_model(meta.arch, pretrained=pretrained, num_classes=0, **timm_kwargs)
        width = self.trunk.num_features
        layers: list[nn.Module] = []
        for hidden in meta.head.hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(meta.head.dropout)]
            width = hidden
        if not meta.head.hidden and meta.head.dropout:
            layers.append(nn.Dropout(meta.head.dropout))
        layers.append(nn.Linear(width, len(meta.classes)))
        self.head = nn.Sequential(*layers)
        self.num_features = self.trunk.num_features
        self._add_ood(meta)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised trunk features (what the head reads)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the OOD check's features) in one pass: what inference needs."""
        fmap = self.trunk.forward_features(x)
        pooled = self.trunk.forward_head(fmap)  # == self.trunk(x): the trunk has no classifier
        if self.ood_features == "stage":
            # The last stage's map averaged over space (over tokens for a transformer).
            return self.head(pooled), fmap.mean(dim=(2, 3)) if fmap.ndim == 4 else fmap.mean(dim=1)
        return self.head(pooled), pooled


class EnsembleNet(_OODCheck):
    """Several networks of one architecture as one bundle (`BundleMeta.members`).

    Its logits are the log of the average of the members' calibrated probabilities (each with its
    own temperature), so the bundle's temperature calibrates the ensemble as a whole and every
    front end, the int8 path and the thresholds treat it as one model.  The out-of-distribution
    features are the members' side by side (their statistics block-diagonal: the distance to a
    class is the sum of the members' distances to it)."""

    def __init__(self, meta: BundleMeta, pretrained: bool = False, **timm_kwargs: Any) -> None:
        super().__init__()
        single = replace(meta, members=[], ood=None)
        self.members = nn.ModuleList(BundleNet(single, pretrained=pretrained, **timm_kwargs) for _ in meta.members)
        # Not in the state dict: the temperatures are part of bundle.json's contract.
        self.register_buffer("temperatures", torch.tensor([m["temperature"] for m in meta.members]), persistent=False)
        # A member trained at a smaller size sees the ensemble's input resized to it, in the graph
        # (antialiased: torch's match for Pillow's filter), so one decode serves every member.
        self.sizes = [m.get("size", meta.input.size) for m in meta.members]
        self.input_size = meta.input.size
        self.resample = meta.input.interpolation
        self.num_features = sum(m.num_features for m in self.members)
        self._add_ood(meta)

    @property
    def ood_features(self) -> str:
        return self.members[0].ood_features

    @ood_features.setter
    def ood_features(self, value: str) -> None:
        for m in self.members:
            m.ood_features = value

    @property
    def trunk(self) -> nn.Module:
        """The first member's trunk: Grad-CAM follows the ensemble's answer back through it."""
        return self.members[0].trunk

    def _input_of(self, i: int, x: torch.Tensor) -> torch.Tensor:
        size = self.sizes[i]
        if size == self.input_size:
            return x
        return nn.functional.interpolate(x, size=(size, size), mode=self.resample, antialias=True, align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(self._input_of(i, x)) for i, m in enumerate(self.members)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, features = [], []
        for i, m in enumerate(self.members):
            logits, f = m.forward_with_features(self._input_of(i, x))
            # fp32 by promotion with a 1-element (not 0-d) fp32 tensor, whatever autocast gave:
            # an explicit cast would pin the exported graph to one dtype, and the int8 package
            # runs it again under bf16
            log_probs.append(torch.log_softmax(logits / self.temperatures[i : i + 1], dim=1))
            features.append(f)
        # log of the mean probability, without underflow where one member is sure
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.members))
        return mean, torch.cat(features, dim=1)


def ood_distance(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of `features` to the nearest of `means` (k, d)
    under the shared `precision` (d, d)."""
    f = features.float()
    diff = f[:, None, :] - means[None, :, :]  # (n, k, d)
    dist = torch.einsum("nkd,de,nke->nk", diff, precision, diff)
    return dist.min(dim=1).values


@dataclass
class Bundle:
    """A loaded bundle whose weights matched their sha256.  The network is built on first use
    of `model` (building it imports timm: seconds that a run from a kept int8 package, which
    holds the whole network, does not need); the out-of-distribution statistics are at hand
    without it."""

    path: Path
    meta: BundleMeta
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    ood_stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _model: BundleNet | EnsembleNet | None = field(default=None, repr=False)

    @property
    def model(self) -> BundleNet | EnsembleNet:
        """The network with the bundle's weights (built and shape-checked on first use)."""
        if self._model is None:
            assert self.state is not None
            model = build_model(self.meta)
            _check_state(model, self.state, self.path / WEIGHTS_FILE, self.meta.arch)
            model.load_state_dict(self.state, strict=True)
            self._model = model.eval()
            self.state = None  # the model holds the weights now
        return self._model

    @property
    def model_built(self) -> bool:
        return self._model is not None

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def sha256(self) -> str:
        return self.meta.weights_sha256

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def labels(self) -> list[str]:
        return self.meta.labels


def build_model(meta: BundleMeta, pretrained: bool = False, **timm_kwargs: Any) -> BundleNet | EnsembleNet:
    """The network a bundle describes, with fresh (or ImageNet, when `pretrained`) weights."""
    import timm

    if not timm.is_model(meta.arch):
        raise BundleError(f"unknown timm architecture {meta.arch!r}")
    return (EnsembleNet if meta.members else BundleNet)(meta, pretrained=pretrained, **timm_kwargs)


def save_bundle(model: nn.Module, meta: BundleMeta, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` and `meta` as a bundle folder; floating weights are stored as `dtype`
    (float16 halves the file).  The weights' sha256 is filled into the saved meta."""
    meta.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(_stored_dtype(k, dtype)) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    weights = atomic_write(folder / WEIGHTS_FILE,
                           lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "arch": meta.arch}))
    meta.weights_sha256 = file_sha256(weights)
    meta.weights_dtype = str(dtype).removeprefix("torch.")
    _write_json_atomic(folder / META_FILE, meta.to_json())
    return folder


def _stored_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    # The OOD statistics stay float32 whatever the weights' dtype: a precision matrix rounded to
    # fp16 moves Mahalanobis distances, and so which images get flagged.
    return torch.float32 if key.startswith("ood_") else dtype


def save_int8_calibration(folder: Path, images: torch.Tensor, check: dict[str, Any]) -> BundleMeta:
    """Store int8 calibration images (uint8 N,3,H,W at the input size) and the int8-vs-fp32
    check in the bundle at `folder`; the weights are untouched."""
    folder = Path(folder)
    meta = read_meta(folder)
    if problem := _calibration_problem(images, meta.input.size):
        raise BundleError(f"int8 calibration: {problem}")
    target = atomic_write(folder / CALIBRATION_FILE, lambda tmp: save_file({"images": images.contiguous().cpu()}, str(tmp)))
    meta.int8 = Int8Spec(calibration_sha256=file_sha256(target), images=len(images), check=dict(check))
    _write_json_atomic(folder / META_FILE, meta.to_json())
    return meta


def record_metrics(folder: Path, metrics: dict[str, Any]) -> BundleMeta:
    """Add `metrics` (e.g. the test split's, from `bcc-train evaluate --record`) to the bundle at
    `folder`, so that `bcc info` and the app show them; the weights are untouched."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta.metrics.update(metrics)
    _write_json_atomic(folder / META_FILE, meta.to_json())
    return meta


def record_verdict(folder: Path, verdict: Verdict) -> BundleMeta:
    """Store the trainer's `verdict` in the bundle at `folder` (the weights are untouched)."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta.verdict = verdict
    _write_json_atomic(folder / META_FILE, meta.to_json())
    return meta


def record_thresholds(
    folder: Path, metrics: dict[str, Any], review: float | None = None, ood: float | None = None,
    forget: tuple[str, ...] = (), temperature: float | None = None, slide_review: float | None = None,
    colour: float | None = None,
) -> BundleMeta:
    """Set the review thresholds and/or the out-of-distribution and colour ones (and the temperature) of the bundle at
    `folder` (the trainer chooses them on the application's own predictions), record how they were
    chosen and drop the `forget` metrics they made stale; the weights are untouched."""
    folder = Path(folder)
    meta = read_meta(folder)
    if temperature is not None:
        meta.temperature = float(temperature)
    if review is not None:
        meta.review_threshold = float(review)
    if slide_review is not None:
        meta.slide_review_threshold = float(slide_review)
    if ood is not None:
        if meta.ood is None:
            raise BundleError(f"{folder} has no out-of-distribution check to set a threshold for")
        meta.ood = replace(meta.ood, threshold=float(ood))
    if colour is not None:
        if meta.colour is None:
            raise BundleError(f"{folder} has no colour check to set a threshold for")
        meta.colour = replace(meta.colour, threshold=float(colour))
    meta.metrics.update(metrics)
    for key in forget:
        meta.metrics.pop(key, None)
    meta.validate()
    _write_json_atomic(folder / META_FILE, meta.to_json())
    return meta


def record_colour_profile(folder: Path, colour: ColourSpec) -> BundleMeta:
    """Give the bundle at `folder` a colour check (`bcc-train colour-check`); weights untouched."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta.colour = colour
    meta.validate()
    _write_json_atomic(folder / META_FILE, meta.to_json())
    return meta


def clear_int8_calibration(folder: Path) -> None:
    """Take int8 out of the bundle at `folder` (the weights are untouched)."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta.int8 = None
    _write_json_atomic(folder / META_FILE, meta.to_json())
    (folder / CALIBRATION_FILE).unlink(missing_ok=True)


def load_int8_calibration(bundle: Bundle) -> torch.Tensor:
    """The bundle's int8 calibration images, verified like the weights."""
    spec = bundle.meta.int8
    path = bundle.path / CALIBRATION_FILE
    if spec is None:
        raise BundleError(
            f"model {bundle.name} carries no int8 calibration; add it with: "
            "bcc-train int8 BUNDLE DATA --split RUN/split.csv"
        )
    if not path.is_file():
        raise BundleError(f"{bundle.path} has no {CALIBRATION_FILE}, which its bundle.json declares")
    if file_sha256(path) != spec.calibration_sha256:
        raise BundleError(f"{path} does not match its bundle: sha256 differs (corrupt or replaced file)")
    try:
        images = load_file(str(path))["images"]
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path} is not a readable calibration file ({one_line(exc, limit=200)})") from None
    if problem := _calibration_problem(images, bundle.meta.input.size):
        raise BundleError(f"{path}: {problem}")
    return images


def _calibration_problem(images: torch.Tensor, size: int) -> str | None:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size) or not len(images):
        return f"expected uint8 images (N, 3, {size}, {size}), got {images.dtype} {tuple(images.shape)}"
    return None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def load_bundle(folder: Path | str, build: bool = True) -> Bundle:
    """Read and verify a bundle; raise `BundleError` naming what is wrong.  With `build` False
    the network (and the check of every tensor's shape against the architecture) waits for the
    first use of `Bundle.model`."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    meta = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{folder} has no {WEIGHTS_FILE}")
    if not meta.weights_sha256:
        raise BundleError(f"{folder / META_FILE} records no weights_sha256: cannot verify the weights")
    try:
        data = weights.read_bytes()  # read once: the bytes hashed are the bytes used
    except OSError as exc:
        raise BundleError(f"{weights} cannot be read ({one_line(exc, limit=200)})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.weights_sha256:
        raise BundleError(
            f"{weights} does not match its bundle: sha256 {actual[:12]}… but bundle.json says "
            f"{meta.weights_sha256[:12]}… (corrupt or replaced file)"
        )
    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights} is not a readable safetensors file ({one_line(exc, limit=200)})") from None
    del data
    # NaN or infinite weights (a sha256 matched by whoever planted them) answer nothing: refused
    # here, where `bcc info` and every run read them, not on the first batch.
    if broken := next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None):
        raise BundleError(f"{weights} holds values that are not numbers (NaN or infinite; first in {broken}): "
                          "the weights are damaged; retrain or re-export the bundle")
    bundle = Bundle(path=folder, meta=meta, state=state)
    if build:
        bundle.model  # noqa: B018 - build and check every shape now, where the caller expects errors
    if meta.ood is not None:
        if "ood_means" not in state or "ood_precision" not in state:
            raise BundleError(f"{weights} lacks the out-of-distribution statistics its bundle.json declares")
        bundle.ood_stats = (state["ood_means"].float(), state["ood_precision"].float())
    return bundle


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, arch: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensors of the wrong shape (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise BundleError(f"{weights} does not fit the declared {arch}: " + "; ".join(parts))
