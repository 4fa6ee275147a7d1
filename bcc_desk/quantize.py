"""Static int8 inference on x86 CPUs: about twice the speed of bf16 for ConvNeXt Tiny.

The network is exported, its activation ranges are calibrated on the images the bundle carries
for that purpose (validation images chosen by the trainer, so a run never depends on the images
it classifies), its linear layers are converted to int8 with torchao's PT2E
`X86InductorQuantizer`, and the result is compiled by inductor with weight freezing (without
freezing the int8 graph is no faster than bf16: measured in bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from bcc_desk.bundle import InputSpec

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A network's forward pass returning (logits, pooled features)."""


class Int8Unavailable(Exception):
    """int8 cannot run here; the message says why in one line."""


def int8_unavailable_reason(device: torch.device) -> str | None:
    """None when static int8 can run on `device`, else a short reason."""
    if device.type != "cpu":
        return f"int8 runs on x86 CPUs only, not on {device.type}"
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return f"int8 needs an x86 CPU, this one is {platform.machine()}"
    # torch logs a deprecation note about one of torchao's enums at import: not for a lab user.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing or incompatible torchao: fall back
        return f"torchao is not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return None


class _WithFeatures(nn.Module):
    """Export needs a module whose forward is the (logits, features) pass."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_features(x)


def quantize_int8(
    model: nn.Module,
    calibration: torch.Tensor,
    spec: InputSpec,
    batch_size: int,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> Forward:
    """`model` (a BundleNet on the CPU, eval mode) as a compiled static-int8 forward for batches
    of exactly `batch_size` images.  `calibration` is uint8 (N, 3, size, size).  Raises
    Int8Unavailable when torchao, export or the C++ compiler fails."""
    from bcc_desk.classifier import autocast, normalise, pad_batch  # the same numerics as every other path

    reason = int8_unavailable_reason(torch.device("cpu"))
    if reason:
        raise Int8Unavailable(reason)
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    inputs = normalise(calibration, spec)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torchao and export announce API migrations at every call: noise for a lab user.
            warnings.simplefilter("ignore")
            batches = [pad_batch(inputs[i : i + batch_size], batch_size) for i in range(0, len(inputs), batch_size)]
            example = batches[0]
            exported = torch.export.export(_WithFeatures(model).eval(), (example,)).module()
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
            compiled = torch.compile(converted, dynamic=False)

            def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                # Freezing is read whenever inductor compiles: at the first call, and again at
                # any recompile (dynamo recompiles when the grad mode differs, for one).
                with inductor_config.patch(freezing=True):
                    return compiled(x)

            with torch.inference_mode(), autocast(torch.device("cpu"), autocast_dtype):
                forward(example)  # compile now, in the mode the classifier runs in
    except Int8Unavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - no compiler, unsupported op, ...: the caller falls back
        text = str(exc).strip().splitlines()
        raise Int8Unavailable((text[0] if text else type(exc).__name__)[:200]) from None
    return forward



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
    names = ["net.head"]
    info = getattr(model.trunk, "feature_info", None)
    if info:
        names.append(f"net.trunk.{info[-1]['module']}")
    return names
