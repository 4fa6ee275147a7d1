"""Where and in what numerics the network runs: device choice, autocast dtype, the label the
report and status bar show.  Shared by the engine, the trainer and the benchmarks."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for 'auto'; a named device must exist (one-line ValueError otherwise)."""
    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for, but Apple MPS is not available here")
    return device


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 / AMX), where it is ~2x faster
    than fp32; elsewhere bf16 is emulated and slower, so fp32 is the fast choice."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device` (None = plain fp32); for 'int8', that of the layers
    left in floating point."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 runs on x86 CPUs, not on {device.type}: use auto, bf16 or fp16 there")
        precision = "auto"
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision in `dtype` on `device`, or a no-op for plain fp32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def default_batch_size(device: torch.device) -> int:
    """Small batches are fastest on a CPU (they stay in cache: 8 measured ~25% faster than 32 on
    the 2-core bench machine); a GPU wants large ones."""
    return 8 if device.type == "cpu" else 64


def device_label(device: torch.device, dtype: torch.dtype | None, int8: bool = False) -> str:
    """'cuda:0 NVIDIA H100 (bf16)' / 'cpu (int8+bf16)': what the report and status bar show."""
    name = str(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return f"{name} ({'int8+' if int8 else ''}{precision})"
