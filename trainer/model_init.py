"""The network a run starts from, and its description: from scratch, a parent bundle (fine-tuning),
timm's ImageNet trunk or a local trunk file."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from bcc_desk.bundle import Bundle, BundleError, BundleMeta, BundleNet, HeadSpec, InputSpec, build_model, read_meta
from trainer.config import FitConfig, FitError

log = logging.getLogger("bcc-train")


def build_meta(cfg: FitConfig, classes: list[str]) -> BundleMeta:
    import timm

    if not timm.is_model(cfg.arch):
        raise FitError(f"unknown timm architecture {cfg.arch!r} (see timm.list_models())")
    data_cfg = timm.get_pretrained_cfg(cfg.arch)
    mean = tuple(data_cfg.mean) if data_cfg else InputSpec().mean
    std = tuple(data_cfg.std) if data_cfg else InputSpec().std
    return BundleMeta(
        name=cfg.name or f"bcc-{cfg.arch}-{datetime.now(timezone.utc):%Y%m%d-%H%M}",
        arch=cfg.arch,
        classes=classes,
        # The fields are whole 224-px images: resize to the input size, no centre crop.
        input=InputSpec(size=cfg.image_size, crop_pct=1.0, interpolation="bicubic", mean=mean, std=std,
                        channels=cfg.channels),
        head=HeadSpec(hidden=list(cfg.hidden), dropout=cfg.dropout),
        # Written out, so that a lab can rename a class in bundle.json without retraining.
        display_names=BundleMeta(name="", arch=cfg.arch, classes=classes).labels,
    )


def child_meta(cfg: FitConfig, parent: BundleMeta) -> BundleMeta:
    """A fine-tuned model's description: the parent's network, classes (and their display names)
    and input (at `cfg.image_size`, which may step up from the parent's), under a new name;
    calibration and the OOD check are fitted again at export."""
    return BundleMeta(
        name=cfg.name or f"{parent.name}-ft-{datetime.now(timezone.utc):%Y%m%d-%H%M}",
        arch=parent.arch, classes=list(parent.classes), input=replace(parent.input, size=cfg.image_size, channels=cfg.channels),
        head=parent.head,
        display_names=list(parent.labels),
    )


def parent_bundle(cfg: FitConfig) -> Bundle | None:
    """The bundle `--init-bundle` names, checked against the run's network (None without one)."""
    from bcc_desk.bundle import load_bundle

    if cfg.init_bundle is None:
        return None
    try:
        parent = load_bundle(cfg.init_bundle, build=False)
    except BundleError as exc:
        raise FitError(f"--init-bundle: {exc}") from None
    # The input size may change (a resolution step: ConvNeXt's trunk and head do not depend on it);
    # the network and the head's shape must not, or the parent's weights would not fit.
    if parent.meta.arch != cfg.arch or parent.meta.head.hidden != list(cfg.hidden):
        raise FitError(
            f"--init-bundle: {parent.name} is {parent.meta.arch} with a head of "
            f"{parent.meta.head.hidden}; leave out --arch and --hidden (or give those)"
        )
    return parent


def classes_as_parent(data_classes: list[str], parent: BundleMeta, where: Path | None) -> list[str]:
    """DATA's class folders in the parent's output order; the classes must be the same."""
    order: dict[int, str] = {}
    for c in data_classes:
        i = parent.class_index(c)
        if i is None:
            raise FitError(
                f"--init-bundle: the data's class {c!r} is not one of {Path(where or '').name}'s classes "
                f"({', '.join(parent.labels)}); fine-tuning keeps the classes, train from scratch to change them"
            )
        if i in order:
            raise FitError(f"--init-bundle: the data's folders {order[i]!r} and {c!r} are both the class {parent.labels[i]}")
        order[i] = c
    missing = [parent.labels[i] for i in range(len(parent.classes)) if i not in order]
    if missing:
        raise FitError(f"--init-bundle: the data has no images of {', '.join(missing)}; fine-tuning keeps every class")
    return [order[i] for i in range(len(parent.classes))]


def create_model(cfg: FitConfig, meta: BundleMeta, parent: Bundle | None = None) -> BundleNet:
    """The network with its initial weights: a parent bundle's, timm's ImageNet trunk (offline:
    one line), a local trunk file, or none."""
    if parent is not None:
        model = build_model(meta, drop_path_rate=cfg.drop_path)
        # Weights only: the OOD statistics belong to the parent's training data and are refitted.
        state = {k: v.float() for k, v in (parent.state or {}).items() if not k.startswith("ood_")}
        model.load_state_dict(state, strict=True)
        return model
    if cfg.init == "pretrained":
        return _pretrained_model(cfg, meta)
    model = build_model(meta, drop_path_rate=cfg.drop_path)
    if cfg.init not in ("none", ""):
        load_trunk_weights(model, Path(cfg.init))
    return model


def _pretrained_model(cfg: FitConfig, meta: BundleMeta) -> BundleNet:
    """timm's ImageNet weights: from the local cache, or downloaded when the hub answers.

    The hub is probed first (a few seconds at most) because an unreachable hub otherwise costs
    a minute of retries before any error; offline, only the cache is tried."""
    from huggingface_hub import constants

    online = not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT)
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not online
    try:
        return build_model(meta, pretrained=True, drop_path_rate=cfg.drop_path)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        why = "no network access to the model hub" if not online else type(exc).__name__
        raise FitError(
            f"cannot get ImageNet weights for {cfg.arch} ({why}); "
            "use --init-weights FILE (a local timm weights file) or --no-pretrained"
        ) from None
    finally:
        constants.HF_HUB_OFFLINE = saved


def _reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_trunk_weights(model: BundleNet, path: Path) -> None:
    """Initialise the trunk from a local timm weights file (.safetensors, or .pth/.bin read with
    weights_only=True so a file cannot run code); the classifier head is left fresh."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise FitError(f"--init-weights: {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the verdict below says it
            warnings.simplefilter("ignore", UserWarning)
            state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FitError(f"--init-weights: {path} is not a readable weights file ({type(exc).__name__})") from None
    own = model.trunk.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.9 * len(own):
        raise FitError(
            f"--init-weights: {path} does not fit {model.trunk.default_cfg.get('architecture', 'the trunk')}: "
            f"only {len(usable)} of {len(own)} trunk tensors match"
        )
    model.trunk.load_state_dict(usable, strict=False)


def parent_settings(bundle: Path) -> dict[str, object]:
    """What a fine-tuned model takes from its parent bundle (options given still override)."""
    try:
        meta = read_meta(bundle)
    except BundleError as exc:
        raise ValueError(f"--init-bundle: {exc}") from None
    return {"arch": meta.arch, "image_size": meta.input.size, "channels": meta.input.channels, "hidden": list(meta.head.hidden),
            "dropout": meta.head.dropout}
