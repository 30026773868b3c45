"""Mixed-precision choice: bf16 autocast where the hardware has fast bf16, fp16 + GradScaler on
GPUs without it, fp32 otherwise. On a CPU, AMP is only used when the CPU has native bf16 *and* a
short probe shows it is faster (AMP must never make a run slower)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    use_scaler: bool  # fp16 needs a GradScaler
    reason: str  # printed so users see what was chosen and why

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 dot products natively (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(amp: bool, device: torch.device) -> Precision:
    """What ``--amp`` means on this device, before any CPU speed probe."""
    if not amp:
        return Precision(None, False, "fp32 (AMP off)")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False, "bf16 autocast (GPU has native bf16)")
        return Precision(torch.float16, True, "fp16 autocast + GradScaler (GPU lacks fast bf16)")
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return Precision(torch.bfloat16, False, "bf16 autocast (CPU has native bf16)")
        return Precision(None, False, "fp32: this CPU has no native bf16 (no AVX512-BF16/AMX), "
                                      "so AMP would be slower; running fp32")
    return Precision(None, False, f"fp32: no AMP support chosen for device {device.type}")


def amp_dtype(amp: bool, device: torch.device) -> tuple[str | None, str]:
    """What ``--amp`` of the sample/evaluate CLIs means on ``device``: the autocast dtype name
    (``SampleSettings.amp``: None = fp32, "bf16", "fp16") that :func:`choose_precision` picks, and why.
    Sampling has no GradScaler (no weights are updated) and no speed probe."""
    precision = choose_precision(amp, device)
    return (None if precision.dtype is None else precision.name), precision.reason


def autocast(device: torch.device, precision: Precision):
    """An autocast context for the precision, or a no-op context for fp32."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)
