"""What a model bundle's `bundle.json` says, read without torch: the class names, the input a
network wants, its thresholds.  The desktop app lists, compares and shows bundles with this alone
(its own process never loads a network to classify); `bcc_desk.bundle` loads the weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bcc_desk.colour import ColourSpec
from bcc_desk.stats import wilson_interval

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
    channels: str = "rgb"
    """What the network sees of a pixel: 'rgb'; 'hue-free' (its brightest and darkest channel
    and their difference, standardised per image: `preprocess.normalise`), which no hue rotation,
    brightness or contrast change of the whole field can move (issue #35); or 'hue-sat-free' (its
    darkest channel and chroma, each standardised alone), which no saturation change moves either."""


INPUT_CHANNELS = ("rgb", "hue-free", "hue-sat-free")
INPUT_BLIND_TO = {"hue-free": "the field's hue or brightness", "hue-sat-free": "the field's hue, saturation or brightness"}
"""What a network of each non-RGB input cannot see (`bcc info`)."""


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
class Verdict:
    """The trainer's word on the bundle it wrote (`trainer/verdict.py`): fit for use only where
    its validation was large enough to measure it and it passed there; otherwise the reasons.
    `bcc classify`, `bcc watch` and the app run a bundle that is not fit for use only when told
    to (`--allow-unvalidated`), and every report of such a run says so on every page."""

    fit_for_use: bool
    reasons: list[str] = field(default_factory=list)
    """Why it is not fit for use (empty when it is)."""
    rule: str = ""
    """The rule it was judged by, in words."""

    @property
    def text(self) -> str:
        return "fit for use" if self.fit_for_use else f"NOT VALIDATED: {'; '.join(self.reasons) or 'no reason recorded'}"


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
    slide_review_threshold: float | None = None
    """The cut-off for an image that agrees with the rest of its slide (two or more classified
    images): chosen on validation among the images no other reason flags, the slides' consensus
    flagging the rest (`bcc_desk.slides`).  None: `review_threshold`, as for an image alone."""
    ood: OODSpec | None = None
    colour: ColourSpec | None = None
    """The colour check (`bcc_desk.colour`): the training set's colour profile and its cut-off."""
    int8: Int8Spec | None = None
    verdict: Verdict | None = None
    """The trainer's verdict; None for a bundle written before verdicts (run as before, and said so)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    display_names: list[str] = field(default_factory=list)
    """What every front end calls each class (empty: derived from `classes` by `display_name`)."""
    members: list[dict[str, Any]] = field(default_factory=list)
    """An ensemble (`bcc-train ensemble`): one record per network, each {'name', 'weights_sha256',
    'temperature'} of the bundle it came from.  The networks share `arch`, `head` and `input`; the
    bundle's output is the average of their calibrated probabilities, which `temperature` then
    calibrates as one model.  Empty: a single network."""

    @property
    def labels(self) -> list[str]:
        """The class names a user reads, in output order: the table, the image pane, the report,
        the console and the sample folders all use these."""
        if self.display_names:
            return list(self.display_names)
        derived = [display_name(c) for c in self.classes]
        return derived if len(set(derived)) == len(derived) else list(self.classes)

    def class_index(self, name: str) -> int | None:
        """The output index of a class given by its folder name or its display name (case and
        the data set's bracketed tag ignored): a lab's own data folder may be named either way."""
        wanted = display_name(name).casefold()
        for i, (cls, label) in enumerate(zip(self.classes, self.labels, strict=True)):
            if wanted in (display_name(cls).casefold(), label.casefold()) or name == cls:
                return i
        return None

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
                    size=_whole(inp.get("size", 224), "input.size"),
                    crop_pct=float(inp.get("crop_pct", 1.0)),
                    interpolation=str(inp.get("interpolation", "bicubic")),
                    mean=_rgb(inp.get("mean", IMAGENET_MEAN), "input.mean"),
                    std=_rgb(inp.get("std", IMAGENET_STD), "input.std"),
                    channels=_channels(inp.get("channels", "rgb")),
                ),
                head=HeadSpec(**(data.get("head") or {})),
                temperature=float(data.get("temperature", 1.0)),
                review_threshold=float(data.get("review_threshold", 0.0)),
                slide_review_threshold=(None if data.get("slide_review_threshold") is None
                                        else float(data["slide_review_threshold"])),
                ood=OODSpec(**ood) if ood else None,
                colour=ColourSpec.from_json(data["colour"]) if data.get("colour") else None,
                int8=Int8Spec(**int8) if int8 else None,
                verdict=_verdict(data["verdict"]) if data.get("verdict") is not None else None,
                provenance=dict(data.get("provenance") or {}),
                metrics=dict(data.get("metrics") or {}),
                weights_sha256=str(data.get("weights_sha256", "")),
                weights_dtype=str(data.get("weights_dtype", "float32")),
                display_names=[str(c) for c in data.get("display_names") or []],
                members=[_member(m) for m in data.get("members") or []],
            )
        except (TypeError, ValueError, KeyError, OverflowError) as exc:  # Overflow: int(Infinity)
            raise ValueError(f"malformed field ({exc})") from None

    def validate(self) -> None:
        """Refuse what no trainer writes and a network cannot run on: each failure one line naming
        the field (a damaged or hostile bundle.json must never become confident nonsense, a
        runaway allocation or a traceback)."""
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be two or more distinct names, got {self.classes}")
        if self.display_names and (len(self.display_names) != len(self.classes)
                                   or len(set(self.display_names)) != len(self.display_names)):
            raise ValueError(f"display_names must be one distinct name per class, got {self.display_names}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.review_threshold <= 1.0:
            raise ValueError(f"review_threshold must be within 0..1, got {self.review_threshold}")
        if self.slide_review_threshold is not None and not 0.0 <= self.slide_review_threshold <= 1.0:
            raise ValueError(f"slide_review_threshold must be within 0..1, got {self.slide_review_threshold}")
        if self.input.size < 16 or not 0 < self.input.crop_pct <= 1:
            raise ValueError(f"bad input spec {self.input}")
        if self.members and (len(self.members) < 2 or not all(m["temperature"] > 0 for m in self.members)):
            raise ValueError("an ensemble needs two or more members, each with a positive temperature")
        if self.input.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.input.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if any(not 16 <= m.get("size", self.input.size) <= self.input.size for m in self.members):
            raise ValueError(f"an ensemble member's input size must be within 16..{self.input.size} (the ensemble's)")
        if any("size" in m for m in self.members) and self.input.interpolation not in ("bilinear", "bicubic"):
            raise ValueError("members of other input sizes need bilinear or bicubic interpolation")
        _bounded(self.temperature, "temperature", *TEMPERATURE_RANGE)
        _bounded(self.input.size, "input.size", *INPUT_SIZE_RANGE)
        _bounded(self.input.crop_pct, "input.crop_pct", *CROP_PCT_RANGE)
        for k, (m, s) in enumerate(zip(self.input.mean, self.input.std, strict=True)):
            _bounded(m, f"input.mean[{k}]", 0.0, 1.0)
            _bounded(s, f"input.std[{k}]", *STD_RANGE)
        if not isinstance(self.head.hidden, list):
            raise ValueError(f"head.hidden must be a list of layer widths, not {self.head.hidden!r}")
        if len(self.head.hidden) > MAX_HIDDEN_LAYERS:
            raise ValueError(f"head.hidden has {len(self.head.hidden)} layers; at most {MAX_HIDDEN_LAYERS}")
        for k, width in enumerate(self.head.hidden):
            if not isinstance(width, int) or isinstance(width, bool):
                raise ValueError(f"head.hidden[{k}] must be a whole number, not {width!r}")
            _bounded(width, f"head.hidden[{k}]", 1, MAX_HIDDEN_WIDTH)
        _bounded(self.head.dropout, "head.dropout", 0.0, 0.99)
        if len(self.classes) > MAX_CLASSES:
            raise ValueError(f"classes: {len(self.classes)} names; at most {MAX_CLASSES}")
        if self.ood is not None:
            _bounded(self.ood.threshold, "ood.threshold", 0.0, float("inf"), finite=False)
        for k, member in enumerate(self.members):
            _bounded(member["temperature"], f"members[{k}].temperature", *TEMPERATURE_RANGE)


TEMPERATURE_RANGE = (1e-2, 1e2)
"""Calibration's temperatures lie near 1 (0.5-2 in every bundle so far); one near 0 turns every
logit into infinity, and the softmax into NaN."""
INPUT_SIZE_RANGE = (16, 1024)
"""Pixels of the network's input side; beyond it a batch would not fit a lab PC's memory."""
CROP_PCT_RANGE = (0.5, 1.0)
STD_RANGE = (1e-3, 10.0)
"""Per-channel spread on the 0..1 scale: a zero one divides by zero."""
MAX_HIDDEN_LAYERS, MAX_HIDDEN_WIDTH = 4, 16384
MAX_CLASSES = 1000


def _bounded(value: Any, field: str, low: float, high: float, *, finite: bool = True) -> None:
    """`value` is a number within low..high (and finite): a ValueError naming `field` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must be a number, not {value!r}")
    if math.isnan(value) or (finite and math.isinf(value)) or not low <= value <= high:
        raise ValueError(f"{field} must be a number within {low:g}..{high:g}, got {value!r}")


def _verdict(data: Any) -> Verdict:
    if not isinstance(data, dict) or not isinstance(data.get("fit_for_use"), bool):
        raise ValueError("verdict must be an object with a true/false 'fit_for_use'")
    return Verdict(fit_for_use=data["fit_for_use"], reasons=[str(r) for r in data.get("reasons") or []],
                   rule=str(data.get("rule", "")))


def not_validated(metas: list[BundleMeta]) -> list[BundleMeta]:
    """The bundles whose trainer found them not fit for use (a bundle from before verdicts is not one)."""
    return [m for m in metas if m.verdict is not None and not m.verdict.fit_for_use]


def verdict_text(meta: BundleMeta) -> str:
    """The bundle's verdict as a report states it."""
    return meta.verdict.text if meta.verdict is not None else "not recorded (a bundle from before verdicts)"


def _whole(value: Any, field: str) -> int:
    """A whole number (64 or 64.0), never truncated: 64.5 pixels would run, silently, at 64."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{field} must be a whole number, not {value!r}")
    return int(value)


def _member(data: Any) -> dict[str, Any]:
    """One ensemble member's record, its types checked (a malformed one is a ValueError)."""
    if not isinstance(data, dict):
        raise ValueError(f"an ensemble member must be an object, not {data!r}")
    member = {"name": str(data.get("name", "")), "weights_sha256": str(data.get("weights_sha256", "")),
              "temperature": float(data["temperature"])}
    if "size" in data:  # a member trained at another input size than the ensemble's (see EnsembleNet)
        member["size"] = _whole(data["size"], "an ensemble member's size")
    return member


def display_name(cls: str) -> str:
    """'[Malignant] early Pre-B' -> 'early Pre-B': the public data set's folder names carry a
    bracketed group tag that only adds noise where a class is read."""
    return re.sub(r"^\[[^\]]*\]\s*", "", cls).strip() or cls


def lineage(meta: BundleMeta) -> list[tuple[str, str]]:
    """Where a fine-tuned bundle came from, as (what, text) lines for people: an ensemble's
    members, a fine-tuned one's parent bundle and the review workbooks whose images it learned
    from (none for a model trained afresh)."""
    lines: list[tuple[str, str]] = []
    for m in meta.members:
        lines.append(("ensemble member", f"{m['name']} (weights sha256 {m['weights_sha256'][:16]}\u2026, T={m['temperature']:.3g})"))
    parent = meta.provenance.get("parent")
    if isinstance(parent, dict):
        lines.append(("fine-tuned from", f"{parent.get('name', '?')} (weights sha256 {str(parent.get('sha256', ''))[:16]}\u2026)"))
    for book in meta.provenance.get("reviews") or []:
        parts = book.get("images") or {}
        split = ", ".join(f"{n} {part}" for part, n in parts.items() if n)
        lines.append(("learned from", f"{sum(parts.values())} reviewed images of {book.get('workbook', '?')} ({split})"))
    return lines


# Provenance that `lineage` already tells in words.
_TOLD_BY_LINEAGE = ("parent", "reviews", "members")


def _colour_text(meta: BundleMeta) -> str:
    if meta.colour is None:
        return "no colour check (a bundle from before it)"
    if "shift" not in meta.metrics:  # `fit --no-shift-table`: the check's starting cut-off, more lenient
        return meta.colour.describe() + "; cut-off not chosen under shifts yet (`bcc-train colour-check`)"
    return meta.colour.describe()


def describe(meta: BundleMeta, percent: bool = False) -> list[tuple[str, str]]:
    """A bundle for people, as (field, text) rows: what `bcc info` and the desktop app's model
    dialog both show, in one wording.  `percent`: the review threshold as a percentage (the
    desktop app's threshold box is one).  The recorded metrics are `meta.metrics`, formatted
    with `format_value`."""
    def cut(value: float) -> str:
        return f"{value:.1%}" if percent else f"{value:.3f}"

    threshold = cut(meta.review_threshold)
    if meta.slide_review_threshold is not None:
        threshold += f" alone; {cut(meta.slide_review_threshold)} agreeing with its slide"
    rows = [
        ("name", meta.name),
        ("verdict", verdict_text(meta)),
        ("architecture", meta.arch),
        ("classes", ", ".join(meta.labels)),
        ("class folders", ", ".join(meta.classes)),
        ("input", f"{meta.input.size} px, crop {meta.input.crop_pct:g}, {meta.input.interpolation}"
                  + (f", {meta.input.channels} (the network does not see {INPUT_BLIND_TO[meta.input.channels]})"
                     if meta.input.channels in INPUT_BLIND_TO else "")),
        ("head", f"hidden {meta.head.hidden or 'none'}, dropout {meta.head.dropout:g}"),
        ("temperature", f"{meta.temperature:.4g}"),
        ("review threshold", threshold),
        ("out-of-distribution check", f"{meta.ood.method}, threshold {meta.ood.threshold:.4g}" if meta.ood else "none"),
        ("training colours", _colour_text(meta)),
        ("weights", f"{meta.weights_dtype}, sha256 {meta.weights_sha256}"),
    ]
    rows += lineage(meta)
    rows += [(f"provenance: {k}", format_value(v)) for k, v in meta.provenance.items() if k not in _TOLD_BY_LINEAGE]
    rows += [(f"{part} accuracy", text) for part in ("validation", "test") if (text := accuracy_text(meta.metrics, part))]
    cv = meta.metrics.get("crossval")
    if isinstance(cv, dict) and {"accuracy_mean", "accuracy_ci", "folds", "images", "pooled_accuracy"} <= set(cv):
        lo, hi = cv["accuracy_ci"]
        rows.append(("cross-validated accuracy", f"{cv['accuracy_mean']:.1%} over {cv['folds']} folds of the slides "
                                                 f"(95% CI {lo:.1%}-{hi:.1%}); {cv['pooled_accuracy']:.1%} of all "
                                                 f"{cv['images']} images held out"))
    return rows


def accuracy_text(metrics: dict[str, Any], part: str) -> str:
    """"97.6% of 411 images (95% CI 95.6-98.7%)" from a bundle's recorded figures ('' where the
    accuracy or its n is not recorded): the n and interval beside every accuracy a lab reads."""
    key = "val" if part == "validation" else part
    accuracy, n = metrics.get(f"{key}_accuracy"), metrics.get(f"{key}_images")
    if not isinstance(accuracy, (int, float)) or not isinstance(n, int) or n <= 0:
        return ""
    lo, hi = wilson_interval(round(accuracy * n), n)
    return f"{accuracy:.1%} of {n} images (95% CI {lo:.1%}-{hi:.1%})"


def format_value(value: object, percent: bool = False) -> str:
    """A metadata value as text: floats to 4 significant digits (or, with `percent`, shares as
    percentages), dicts as k=v lists."""
    if isinstance(value, float):
        return f"{value:.1%}" if percent and 0.0 <= value <= 1.0 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v, percent)}" for k, v in value.items())
    return str(value)


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
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise BundleError(f"{meta_path} is {meta_path.stat().st_size:,} bytes: no bundle.json is over "
                          f"{MAX_META_BYTES // 2**20} MB")
    try:
        meta = BundleMeta.from_json(json.loads(meta_path.read_text(encoding="utf-8")))
        meta.validate()
    except RecursionError:
        raise BundleError(f"{meta_path} is nested too deeply to be a bundle.json") from None
    except UnicodeDecodeError:
        raise BundleError(f"{meta_path} is not a text file") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except ValueError as exc:
        raise BundleError(f"{meta_path}: {exc}") from None
    return meta


MAX_META_BYTES = 16 * 2**20
"""bundle.json holds thresholds, metrics and a colour profile: a few hundred kB at most."""


def _rgb(values: Any, field: str) -> tuple[float, float, float]:
    """Three numbers, one per colour channel (ValueError naming `field` otherwise)."""
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 3:
        raise ValueError(f"{field} needs 3 values (red, green, blue), not {len(numbers)}")
    return numbers[0], numbers[1], numbers[2]


def _channels(value: Any) -> str:
    """A known `InputSpec.channels` (a bundle from newer software that sees its input otherwise
    must not be run as if it were RGB)."""
    if value not in INPUT_CHANNELS:
        raise ValueError(f"input.channels {value!r} is not one of {', '.join(INPUT_CHANNELS)}")
    return str(value)


def bundle_fingerprint(folder: Path) -> tuple:
    """Changes when the bundle on disk is replaced (a retrained model saved to the same folder):
    what a cache of loaded bundles compares, without hashing the weights again."""
    stats: list[tuple[int, int] | None] = []
    for name in ("bundle.json", "model.safetensors"):
        try:
            st = (Path(folder) / name).stat()
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    return tuple(stats)
