"""The model bundle: the one contract between the trainer and the application.

A bundle is a folder holding `bundle.json` (what the network is and how to feed it) and
`model.safetensors` (its weights).  Weights are only ever read with safetensors, so opening a
bundle someone hands us cannot run code; the sha256 and every tensor shape are checked before the
model is used, and each failure says in one line which file is wrong and how.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file
from torch import nn

from bcc_desk.files import atomic_write, file_sha256, write_text_atomic

FORMAT_VERSION = 1
META_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
CALIBRATION_FILE = "int8-calibration.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # Pillow's resampling filters


class BundleError(Exception):
    """A bundle that cannot be used; the message is one line a user can act on."""


@dataclass
class InputSpec:
    """How an image becomes the network's input: resize the shorter side to size/crop_pct,
    centre-crop `size`, scale to [0, 1], normalise."""

    size: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class HeadSpec:
    """The classifier head over the pooled trunk features: hidden Linear+GELU+Dropout layers,
    then the output Linear (no hidden layers = timm's plain linear head)."""

    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.0


@dataclass
class OODSpec:
    """Out-of-distribution check: Mahalanobis distance of trunk features to the nearest class
    mean (shared covariance).  Its statistics live in the weights file (`ood.means`,
    `ood.precision`) so the sha256 covers them; a score above `threshold` flags the image.

    `features` says which: 'pooled', the pooled and normalised features the head reads (bundles
    before v2), or 'stage', the spatial mean of the trunk's last feature map before its final
    norm.  The final LayerNorm removes the scale of the activations, which is much of what tells
    another lab's stain and optics apart: on the v2 model 'pooled' flagged none of ood-dev,
    'stage' all of it, both at 5% of validation."""

    threshold: float
    method: str = "mahalanobis"
    features: str = "pooled"

    def __post_init__(self) -> None:
        if self.features not in OOD_FEATURES:
            raise ValueError(f"ood.features must be one of {', '.join(OOD_FEATURES)}, not {self.features!r}")


OOD_FEATURES = ("pooled", "stage")


@dataclass
class Int8Spec:
    """Static int8 inference on x86 CPUs.  `images` validation images at the input size (uint8,
    in CALIBRATION_FILE, hashed here) set the activation ranges, so a run never depends on the
    images it classifies; `check` is how int8 compared with fp32 on the validation split."""

    calibration_sha256: str
    images: int
    check: dict[str, Any] = field(default_factory=dict)


@dataclass
class BundleMeta:
    """Everything in bundle.json."""

    name: str
    arch: str
    classes: list[str]
    """The training data's class folder names, in output order."""
    input: InputSpec = field(default_factory=InputSpec)
    head: HeadSpec = field(default_factory=HeadSpec)
    temperature: float = 1.0
    review_threshold: float = 0.0
    ood: OODSpec | None = None
    int8: Int8Spec | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    display_names: list[str] = field(default_factory=list)
    """What every front end calls each class (empty: derived from `classes` by `display_name`)."""

    @property
    def labels(self) -> list[str]:
        """The class names a user reads, in output order: the table, the image pane, the report,
        the console and the sample folders all use these."""
        if self.display_names:
            return list(self.display_names)
        derived = [display_name(c) for c in self.classes]
        return derived if len(set(derived)) == len(derived) else list(self.classes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> BundleMeta:
        if not isinstance(data, dict) or "arch" not in data or "classes" not in data:
            raise ValueError("it has no 'arch' and 'classes': not a bcc model bundle")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format version {version!r} is not supported (this software reads {FORMAT_VERSION})")
        try:
            inp = data.get("input") or {}
            ood = data.get("ood")
            int8 = data.get("int8")
            return cls(
                name=str(data.get("name") or data["arch"]),
                arch=str(data["arch"]),
                classes=[str(c) for c in data["classes"]],
                input=InputSpec(
                    size=int(inp.get("size", 224)),
                    crop_pct=float(inp.get("crop_pct", 1.0)),
                    interpolation=str(inp.get("interpolation", "bicubic")),
                    mean=tuple(float(v) for v in inp.get("mean", IMAGENET_MEAN)),
                    std=tuple(float(v) for v in inp.get("std", IMAGENET_STD)),
                ),
                head=HeadSpec(**(data.get("head") or {})),
                temperature=float(data.get("temperature", 1.0)),
                review_threshold=float(data.get("review_threshold", 0.0)),
                ood=OODSpec(**ood) if ood else None,
                int8=Int8Spec(**int8) if int8 else None,
                provenance=dict(data.get("provenance") or {}),
                metrics=dict(data.get("metrics") or {}),
                weights_sha256=str(data.get("weights_sha256", "")),
                weights_dtype=str(data.get("weights_dtype", "float32")),
                display_names=[str(c) for c in data.get("display_names") or []],
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"malformed field ({exc})") from None

    def validate(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be two or more distinct names, got {self.classes}")
        if self.display_names and (len(self.display_names) != len(self.classes)
                                   or len(set(self.display_names)) != len(self.display_names)):
            raise ValueError(f"display_names must be one distinct name per class, got {self.display_names}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.review_threshold <= 1.0:
            raise ValueError(f"review_threshold must be within 0..1, got {self.review_threshold}")
        if self.input.size < 16 or not 0 < self.input.crop_pct <= 1:
            raise ValueError(f"bad input spec {self.input}")
        if self.input.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.input.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")


class BundleNet(nn.Module):
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
        self.ood_features = meta.ood.features if meta.ood is not None else "pooled"
        if meta.ood is not None:
            d, k = self.num_features, len(meta.classes)
            self.register_buffer("ood_means", torch.zeros(k, d))
            self.register_buffer("ood_precision", torch.zeros(d, d))

    @property
    def has_ood(self) -> bool:
        return hasattr(self, "ood_means")

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

    def ood_score(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean, per row."""
        return ood_distance(features, self.ood_means, self.ood_precision)


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
    _model: BundleNet | None = field(default=None, repr=False)

    @property
    def model(self) -> BundleNet:
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


def display_name(cls: str) -> str:
    """'[Malignant] early Pre-B' -> 'early Pre-B': the public data set's folder names carry a
    bracketed group tag that only adds noise where a class is read."""
    return re.sub(r"^\[[^\]]*\]\s*", "", cls).strip() or cls


def build_model(meta: BundleMeta, pretrained: bool = False, **timm_kwargs: Any) -> BundleNet:
    """The network a bundle describes, with fresh (or ImageNet, when `pretrained`) weights."""
    import timm

    if not timm.is_model(meta.arch):
        raise BundleError(f"unknown timm architecture {meta.arch!r}")
    return BundleNet(meta, pretrained=pretrained, **timm_kwargs)


def save_bundle(model: BundleNet, meta: BundleMeta, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
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
        raise BundleError(f"{path} is not a readable calibration file ({_one_line(exc)})") from None
    if problem := _calibration_problem(images, bundle.meta.input.size):
        raise BundleError(f"{path}: {problem}")
    return images


def _calibration_problem(images: torch.Tensor, size: int) -> str | None:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size) or not len(images):
        return f"expected uint8 images (N, 3, {size}, {size}), got {images.dtype} {tuple(images.shape)}"
    return None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_meta(folder: Path) -> BundleMeta:
    """bundle.json alone (fast: no weights read), validated."""
    folder = Path(folder)
    if folder.is_file() and folder.name in (META_FILE, WEIGHTS_FILE):
        folder = folder.parent
    if not folder.exists():
        raise BundleError(f"model bundle not found: {folder}")
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{folder} is not a model bundle: it has no {META_FILE}")
    try:
        meta = BundleMeta.from_json(json.loads(meta_path.read_text(encoding="utf-8")))
        meta.validate()
    except UnicodeDecodeError:
        raise BundleError(f"{meta_path} is not a text file") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except ValueError as exc:
        raise BundleError(f"{meta_path}: {exc}") from None
    return meta


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
        raise BundleError(f"{weights} cannot be read ({_one_line(exc)})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.weights_sha256:
        raise BundleError(
            f"{weights} does not match its bundle: sha256 {actual[:12]}… but bundle.json says "
            f"{meta.weights_sha256[:12]}… (corrupt or replaced file)"
        )
    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights} is not a readable safetensors file ({_one_line(exc)})") from None
    del data
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
