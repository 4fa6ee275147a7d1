"""Static int8 inference on x86 CPUs: about twice the speed of compiled bf16 for ConvNeXt Tiny.

The network is exported, its activation ranges are calibrated on the images the bundle carries
for that purpose (validation images chosen by the trainer, so a run never depends on the images
it classifies), its linear layers are converted to int8 with torchao's PT2E
`X86InductorQuantizer`, and the result is compiled ahead of time by AOTInductor with weight
freezing (without freezing the int8 graph is no faster than bf16: measured in bench/RESULTS.md).

Building costs ~25-40 s on 2 cores (in a child process: `int8_forward`), so the compiled
package is kept in the per-user data directory, keyed by everything it depends on (weights, calibration, batch size, numerics, torch
and torchao versions, CPU): later runs load it in a fraction of a second.  A package is only
ever one this program wrote there; its sha256 is checked before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from bcc_desk.bundle import Bundle, BundleError, InputSpec
from bcc_desk.files import file_sha256, unwritable
from bcc_desk.logs import quiet_developer_noise
from bcc_desk.preprocess import normalise, pad_batch  # the same numerics as every other path
from bcc_desk.toolchain import failed_before, remember_failure

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A network's forward pass returning (logits, pooled features)."""

X86 = ("x86_64", "amd64", "i686", "x86")
PACKAGE_SUFFIX = ".pt2"
KEEP_PACKAGES = 6
"""Compiled packages kept in the cache (~50 MB each); the least recently used go first."""


class Int8Unavailable(Exception):
    """int8 cannot run here; the message says why in one line."""


def int8_unavailable_reason(device: torch.device) -> str | None:
    """None when static int8 can run on `device`, else a short reason."""
    if device.type != "cpu":
        return f"int8 runs on x86 CPUs only, not on {device.type}"
    if platform.machine().lower() not in X86:
        return f"int8 needs an x86 CPU, this one is {platform.machine()}"
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing or incompatible torchao: fall back
        return f"torchao is not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return None


def default_cache_dir() -> Path:
    from bcc_desk.paths import user_data_dir

    return user_data_dir() / "int8"


class _WithFeatures(nn.Module):
    """Export needs a module whose forward is the (logits, features) pass."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_features(x)


class _Package(nn.Module):
    """What the ahead-of-time package runs: uint8 images in, normalised inside (inductor fuses
    that into the first layer: ~4% of a batch's time when done apart), under its own autocast
    (the package runs outside the caller's)."""

    def __init__(self, net: nn.Module, spec: InputSpec, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.net, self.spec, self.dtype = net, spec, dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:

        x = normalise(x, self.spec)
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return self.net(x)


def quantize_int8(
    model: nn.Module,
    calibration: torch.Tensor,
    spec: InputSpec,
    batch_size: int,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    *,
    identity: str,
    cache_dir: Path | None = None,
) -> Forward:
    """`model` (a BundleNet on the CPU, eval mode) as a compiled static-int8 forward for batches
    of exactly `batch_size` uint8 images (it normalises them itself).  `calibration` is uint8 (N, 3, size, size); `identity` names
    the weights and calibration (their sha256s) for the package cache in `cache_dir` (default:
    the per-user data directory; None when that cannot be written: then nothing is kept).
    Raises Int8Unavailable when torchao, export or the C++ compiler fails."""
    cache = default_cache_dir() if cache_dir is None else cache_dir
    try:
        key = package_key(identity, spec, batch_size, autocast_dtype)
    except PackageNotFoundError:
        raise Int8Unavailable("torchao is not installed") from None
    package = cache / f"{key}{PACKAGE_SUFFIX}"
    # A kept package needs neither torchao nor the compiler (importing torchao alone costs ~2 s).
    forward = _load_cached(package) if platform.machine().lower() in X86 else None
    if forward is None:
        reason = int8_unavailable_reason(torch.device("cpu"))
        if reason:
            raise Int8Unavailable(reason)
        try:
            with warnings.catch_warnings():
                # torchao and export announce API migrations at every call: noise for a lab user.
                warnings.simplefilter("ignore")
                program = _quantized_program(model, calibration, spec, batch_size, autocast_dtype)
                forward = _compile_to(program, package)
        except Int8Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - no compiler, unsupported op, ...: the caller falls back
            text = str(exc).strip().splitlines()
            raise Int8Unavailable((text[0] if text else type(exc).__name__)[:200]) from None
    return forward


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ERROR = "int8 unavailable: "


def package_identity(bundle: Bundle) -> str:
    """What names a bundle's int8 network: its weights and calibration images (sha256s), what
    bundle.json says the network is (architecture, classes, head, input, OOD features, members)
    and the software that builds it.  A kept package is loaded without building the network
    from the weights: a bundle.json edited to declare other classes or another architecture must
    miss the cache and be refused where the network is built, never run the old package."""
    from bcc_desk import __version__

    meta = bundle.meta
    assert meta.int8 is not None
    network = {"arch": meta.arch, "classes": meta.classes, "head": asdict(meta.head), "input": asdict(meta.input),
               "ood": None if meta.ood is None else [meta.ood.method, meta.ood.features],
               "members": meta.members, "bcc_desk": __version__}
    declared = hashlib.sha256(json.dumps(network, sort_keys=True).encode()).hexdigest()[:16]
    return f"{bundle.sha256}:{meta.int8.calibration_sha256}:{declared}"


def _package_path(bundle: Bundle, batch_size: int, autocast_dtype: torch.dtype | None, cache_dir: Path | None) -> Path:
    """Where the bundle's package for this computer is kept (PackageNotFoundError: no torchao)."""
    cache = default_cache_dir() if cache_dir is None else cache_dir
    return cache / f"{package_key(package_identity(bundle), bundle.meta.input, batch_size, autocast_dtype)}{PACKAGE_SUFFIX}"


def int8_package_ready(bundle: Bundle, batch_size: int, autocast_dtype: torch.dtype | None,
                       cache_dir: Path | None = None) -> bool:
    """Whether a package for the bundle is kept here (not yet checked: loading does that)."""
    if bundle.meta.int8 is None or platform.machine().lower() not in X86:
        return False
    try:
        package = _package_path(bundle, batch_size, autocast_dtype, cache_dir)
    except PackageNotFoundError:
        return False
    return package.is_file() and _sidecar(package).is_file()


def int8_forward(bundle: Bundle, batch_size: int, autocast_dtype: torch.dtype | None,
                 cache_dir: Path | None = None) -> Forward:
    """The bundle's static-int8 forward for batches of `batch_size` uint8 images, from the
    package kept for this computer; a missing one is built first in a child process, so that
    the caller keeps its interpreter (a window's UI thread stalled for 3 s while the build ran
    in its process: bench/RESULTS.md) and its memory.  Raises Int8Unavailable."""
    try:
        package = _package_path(bundle, batch_size, autocast_dtype, cache_dir)
    except PackageNotFoundError:
        raise Int8Unavailable("torchao is not installed") from None
    cache = package.parent
    forward = _load_cached(package) if platform.machine().lower() in X86 else None
    if forward is not None:
        return forward
    if earlier := failed_before(f"int8 {package}"):  # half a minute each time: not again
        raise Int8Unavailable(earlier)
    log.info("preparing int8 for this computer and model (once: about half a minute on 2 cores)")
    if unwritable(cache, create=True):  # nothing could be kept for the child to hand over: build here, once
        from bcc_desk.bundle import load_int8_calibration

        return quantize_int8(bundle.model, load_int8_calibration(bundle), bundle.meta.input, batch_size,
                             autocast_dtype, identity=package_identity(bundle),
                             cache_dir=cache)
    dtype = next(name for name, value in DTYPES.items() if value == autocast_dtype)
    proc = subprocess.run(
        [sys.executable, "-m", "bcc_desk.quantize", str(bundle.path), "--batch-size", str(batch_size),
         "--dtype", dtype, "--cache", str(cache)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(_ERROR)] or proc.stderr.strip().splitlines()
        reason = (lines[-1].removeprefix(_ERROR) if lines else f"exit code {proc.returncode}")[:200]
        remember_failure(f"int8 {package}", reason)
        raise Int8Unavailable(reason)
    forward = _load_cached(package)
    if forward is None:
        raise Int8Unavailable(f"the int8 build left no usable package in {cache}")
    return forward


def package_key(identity: str, spec: InputSpec, batch_size: int, dtype: torch.dtype | None) -> str:
    """What a compiled package depends on, hashed: a change in any of it builds a new one."""
    parts = {
        "identity": identity,
        "input": asdict(spec),
        "batch": batch_size,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "torchao": version("torchao"),
        "python": platform.python_version(),
        "cpu": _cpu_identity(),  # kernels are built for this CPU's instruction set
        "float_modules": "head+last-stage",
        "observer": "minmax-linear",
        "takes": "uint8",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return f"{platform.machine()} {model} {hashlib.sha256(' '.join(sorted(flags)).encode()).hexdigest()[:16]}"


def _quantized_program(
    model: nn.Module, calibration: torch.Tensor, spec: InputSpec, batch_size: int, dtype: torch.dtype | None
) -> torch.export.ExportedProgram:
    """Export, calibrate on the bundle's images, convert the linear layers to int8."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e


    raw = [pad_batch(calibration[i : i + batch_size], batch_size) for i in range(0, len(calibration), batch_size)]
    batches = [normalise(b, spec) for b in raw]
    with torch.no_grad():
        exported = torch.export.export(_WithFeatures(model).eval(), (batches[0],)).module()
        quantizer = xiq.X86InductorQuantizer()
        # Linear layers only: they do most of a ConvNeXt's work (its MLPs), and quantizing
        # the convolutions too moved calibrated confidences by up to 0.12 instead of 0.008.
        quantizer.set_module_type_qconfig(nn.Linear, _linear_config(xiq))
        for name in _float_modules(model):
            quantizer.set_module_name_qconfig(name, None)
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
        return torch.export.export(_Package(converted, spec, dtype), (raw[0],))


def _compile_to(program: torch.export.ExportedProgram, package: Path) -> Forward:
    """Compile `program` into `package` (atomically, with its sha256 beside it) and load it.
    Where the cache cannot be written the package is built in temp and not kept."""
    try:
        package.parent.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=".building-", dir=package.parent)
        keep = True
    except OSError as exc:
        log.info("the int8 cache %s cannot be written (%s); building for this run only", package.parent, exc)
        folder = tempfile.mkdtemp(prefix="bcc-int8-")
        keep = False
    try:
        built = Path(folder) / package.name
        # Inductor freezes weights (and prepacks the int8 ones) only with grad off: without it
        # the package runs at half the speed.
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(built),
                                                     inductor_configs={"freezing": True})
        forward = _load(built)
        if keep:
            _sidecar(package).with_suffix(".tmp").write_text(json.dumps({"sha256": file_sha256(built)}))
            os.replace(built, package)  # atomic: a second process building the same key is harmless
            os.replace(_sidecar(package).with_suffix(".tmp"), _sidecar(package))
            _prune(package.parent)
        return forward
    finally:
        for leftover in Path(folder).glob("*"):
            leftover.unlink(missing_ok=True)
        os.rmdir(folder)


def _sidecar(package: Path) -> Path:
    return package.with_suffix(".json")


def _load(package: Path) -> Forward:
    # torch's own loader, without the wrapper torch._inductor.aoti_load_package puts round it:
    # importing torch._inductor pulls in torch._dynamo, 1.5 s of every run's start-up, for a
    # pytree flatten.  The wrapper stays the fallback should torch move its loader.
    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader is not None:
        run = loader(str(package), "model", False, 1, -1).boxed_run
    else:
        wrapped = torch._inductor.aoti_load_package(str(package))
        run = lambda inputs: list(wrapped(*inputs))  # noqa: E731

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != torch.uint8:  # the package does not check: a float batch would run as bytes
            raise TypeError(f"the int8 package takes uint8 images, not {x.dtype}")
        logits, features = run([x])
        return logits, features

    return forward


def _load_cached(package: Path) -> Forward | None:
    """The cached package's forward, or None (absent, altered or unloadable: it is removed)."""
    try:
        expected = json.loads(_sidecar(package).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        if file_sha256(package) != expected:
            raise ValueError("its sha256 does not match")
        forward = _load(package)
        os.utime(package)  # most recently used: pruned last
        return forward
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
        log.warning("the cached int8 package %s is unusable (%s); rebuilding it", package.name, str(exc)[:120])
        for stale in (package, _sidecar(package)):
            stale.unlink(missing_ok=True)
        return None


def _prune(cache: Path) -> None:
    """Keep the `KEEP_PACKAGES` most recently used packages."""
    packages = sorted(cache.glob(f"*{PACKAGE_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in packages[KEEP_PACKAGES:]:
        for stale in (old, _sidecar(old)):
            stale.unlink(missing_ok=True)


def _linear_config(xiq) -> object:
    """torchao's default x86 config with min/max activation observers instead of histograms:
    the same labels and confidences on the shipped model's validation images, and calibration
    that costs a plain forward pass instead of ~3x that, at every start."""
    from torchao.quantization.pt2e.observer import MinMaxObserver

    config = xiq.get_default_x86_inductor_quantization_config()
    activation = replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return replace(config, input_activation=activation)


def _float_modules(model: nn.Module) -> list[str]:
    """Modules kept in floating point: the head, and the trunk's last stage, whose output the
    pooled features the out-of-distribution distance is measured on come from.  Quantizing that
    stage moved the Mahalanobis scores by ~50% (median) and changed 4.6% of the validation
    images' OOD flags; kept in bf16 it moves them by ~3% for a sixth of the network's work."""
    members = getattr(model, "members", None)  # an ensemble: each member's head and last stage
    nets = [(f"net.members.{i}", net) for i, net in enumerate(members)] if members else [("net", model)]
    names = []
    for prefix, net in nets:
        names.append(f"{prefix}.head")
        info = getattr(net.trunk, "feature_info", None)
        if info:
            names.append(f"{prefix}.trunk.{info[-1]['module']}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Build a bundle's int8 package into the cache (the child process of `int8_forward`)."""
    import argparse

    from bcc_desk.bundle import load_bundle, load_int8_calibration

    ap = argparse.ArgumentParser(prog="python -m bcc_desk.quantize")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    ap.add_argument("--cache", type=Path, required=True)
    args = ap.parse_args(argv)
    quiet_developer_noise()
    try:
        bundle = load_bundle(args.bundle)
        if bundle.meta.int8 is None:
            raise Int8Unavailable(f"{bundle.name} carries no int8 calibration")
        quantize_int8(bundle.model, load_int8_calibration(bundle), bundle.meta.input, args.batch_size,
                      DTYPES[args.dtype], identity=package_identity(bundle),
                      cache_dir=args.cache)
    except (Int8Unavailable, BundleError) as exc:
        print(f"{_ERROR}{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
