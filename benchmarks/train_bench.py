"""Joint-training step harness shared by test_train_step.py (pytest-benchmark) and
train_throughput.py (the 200-step measurement of benchmarks/gpu_check).

One step = the trainer's own ``TrainStep`` (jdm_fast/training/step.py) with the preset's settings:
forward joint loss (the engine runs the keyed loss the trainer runs), backward, clipping, AdamW,
scaler, LR schedule, EMA; on a fixed synthetic batch already on the device (no loader cost).
The baseline gets the same step object around its own model (it draws its own timesteps and
noise with torch's RNG). Variants:

- ``baseline_fp32``: benchmarks/baseline.py (stock torch modules + SDPA), fp32, eager
- ``baseline_amp``: + autocast (bf16 where the device has it; what ``--amp`` chooses)
- ``baseline_amp_compile``: + torch.compile of the model, as the training loop compiles it
- ``baseline_strong``: the same baseline model as strong as plain PyTorch makes it: autocast,
  torch.compile, channels-last weights and input batch (its attention then reads q, k, v as views,
  no copy), ``torch.backends.cudnn.benchmark`` on (CUDA; only while it runs: ``settings``), fused
  AdamW (``TrainStep``'s optimizer on CUDA). The issue's 1.3x goal compares the engine with it.
- ``engine``: ``jdm_fast.models.JointDiffusion`` (fused ops), autocast, torch.compile (the
  trainer's CUDA default; uncompiled on CPUs unless --cpu-compile, as the trainer runs it there),
  channels-last (the trainer's default)
- ``engine_nchw``: the compiled engine in NCHW
- ``engine_eager`` / ``engine_eager_nchw``: the engine without torch.compile, in the default
  layout / in NCHW (what the layout alone is worth; GPU runs)
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import platform
import statistics
import subprocess
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from baseline import BaselineJoint
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models import JointDiffusion
from jdm_fast.training.config import get_preset
from jdm_fast.training.precision import Precision, choose_precision
from jdm_fast.training.step import TrainStep

VARIANTS = ("baseline_fp32", "baseline_amp", "baseline_amp_compile", "baseline_strong", "engine", "engine_nchw",
            "engine_eager", "engine_eager_nchw")
BASELINE = "baseline_fp32"
GOAL_BASELINE = "baseline_strong"  # what the 1.3x goal compares the engine with
COMPILE_BASELINE = "baseline_amp_compile"  # the goal's baseline before baseline_strong: still reported
COMPILED = ("baseline_amp_compile", "baseline_strong", "engine", "engine_nchw")

# Dense (no sparsity) peak TFLOP/s per device: (bf16/fp16 tensor cores, fp32 without tensor cores).
# Substrings of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS = (  # (bf16/fp16 tensor cores, tf32 tensor cores, fp32 without tensor cores), dense
    ("H200", (989.0, 494.7, 67.0)),
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 494.7, 67.0)),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 181.0, 91.6)),
    ("A10G", (70.0, 35.0, 31.2)),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def peak_tflops(name: str, precision: Precision) -> float | None:
    """The device's dense peak for the step's dominant dtype; None for CPUs and unknown devices."""
    for key, (low, tf32, fp32) in PEAK_TFLOPS:
        if key in name:
            if precision.dtype is not None:
                return low
            # fp32 steps are convolution-bound, and cuDNN runs fp32 convolutions in TF32 by default
            return tf32 if torch.backends.cudnn.allow_tf32 else fp32
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_engine(variant: str) -> bool:
    return variant.startswith("engine")


def channels_last(variant: str) -> bool:
    """The engine variants run the trainer's default layout (channels-last), but the NCHW ones;
    ``baseline_strong`` runs channels-last too (weights here, the input batch in ``make_step``)."""
    return (is_engine(variant) and not variant.endswith("_nchw")) or variant == "baseline_strong"


def channels_last_input(variant: str) -> bool:
    """``baseline_strong`` takes its batch channels-last (``make_step``); the engine takes it as the
    loader gives it (NCHW) and lays it out itself."""
    return variant == "baseline_strong"


@contextlib.contextmanager
def settings(variant: str, device: torch.device):
    """Global backend settings a variant runs with, restored on exit: ``baseline_strong`` on CUDA
    turns on ``torch.backends.cudnn.benchmark`` (cuDNN times its convolution algorithms at each
    new shape and keeps the fastest); every other variant runs torch's defaults."""
    before = torch.backends.cudnn.benchmark
    if variant == "baseline_strong" and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def build(variant: str, preset: str, device: torch.device, seed: int = 0):
    """(model, precision, compile?) for a variant of a preset's model; both models from one seed."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    cfg = get_preset(preset)
    diffusion = GaussianDiffusion(make_betas(cfg.schedule, cfg.num_timesteps)).to(device)
    torch.manual_seed(seed)
    if is_engine(variant):
        model = JointDiffusion(cfg.model, diffusion)
    else:
        model = BaselineJoint(cfg.model, diffusion.alphas_cumprod)
    amp = variant != "baseline_fp32"
    return model.to(device).train(), choose_precision(amp, device), variant in COMPILED


def synthetic_batch(preset: str, batch: int, device: torch.device, seed: int = 0):
    """Dataset-shaped images in [-1, 1] and labels, on the device."""
    cfg = get_preset(preset).model
    g = torch.Generator().manual_seed(seed)
    u = cfg.unet
    x = torch.rand(batch, u.in_channels, u.image_size, u.image_size, generator=g) * 2 - 1
    y = torch.randint(0, cfg.head.num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def make_step(model: torch.nn.Module, precision: Precision, compile: bool, preset: str, keyed: bool,
              compile_mode: str = "default", channels_last: bool = False, channels_last_input: bool = False):
    """A callable ``step(x, y) -> detached total loss`` running the trainer's own ``TrainStep``
    (keyed loss for the engine, optimizer, clipping, scaler, LR schedule, EMA, non-finite flag)
    with the preset's settings; each call is the next global step. ``channels_last_input``: the
    step takes the batch channels-last (a copy per step unless it already is; ``baseline_strong``:
    the layout a loader would deliver to a channels-last model)."""
    cfg = dataclasses.replace(get_preset(preset), compile_mode=compile_mode)
    trainer = TrainStep.from_config(cfg, model, precision, compile=compile, keyed=keyed, channels_last=channels_last)
    counter = itertools.count()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if channels_last_input:
            x = x.contiguous(memory_format=torch.channels_last)
        return trainer(x, y, next(counter)).losses[0].detach()
    step.trainer = trainer
    return step


def flops_per_image(preset: str, device: torch.device, batch: int = 2) -> float:
    """Model FLOPs of forward + backward of the joint loss per image (torch.utils.flop_counter),
    counted on the fp32 baseline (same architecture as the engine; our custom ops are not
    counted by FlopCounterMode). SDPA runs its math backend here so its matmuls are counted."""
    model, _, _ = build(BASELINE, preset, device)
    x, y = synthetic_batch(preset, batch, device)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x, y)[0].backward()
    return counter.get_total_flops() / batch


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no per-variant peak on CPUs (process RSS only ever grows)
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_state(device: torch.device) -> dict:
    """The GPU's SM clock (MHz) and temperature (C) now: torch.cuda.clock_rate / temperature (they
    need pynvml), else nvidia-smi; None for both on CPUs or when neither answers."""
    state = {"sm_clock_mhz": None, "temperature_c": None}
    if device.type != "cuda":
        return state
    try:
        state = {"sm_clock_mhz": float(torch.cuda.clock_rate(device)),
                 "temperature_c": float(torch.cuda.temperature(device))}
    except Exception:  # no pynvml (ModuleNotFoundError), an older torch (AttributeError), NVML errors
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=clocks.sm,temperature.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            clock, temp = out.stdout.strip().splitlines()[0].split(",")
            state = {"sm_clock_mhz": float(clock), "temperature_c": float(temp)}
        except Exception:
            pass
    return state


def measure(step, x, y, steps: int, warmup: int, device: torch.device, before_timing=None, windows: int = 1) -> dict:
    """Time ``windows`` windows of ``steps`` steps each after ``warmup`` steps (compilation
    included there): CUDA events on a GPU, perf_counter elsewhere. images/s and ms/step are the
    median window's; min / max / each window's images/s beside; peak memory of the timed steps;
    the GPU's SM clock and temperature before the first and after the last window.
    ``before_timing()`` runs between warm-up and timing (benchmarks/gpu_check waited there)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step(x, y)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    if before_timing is not None:
        before_timing()
    gpu_start = gpu_state(device)
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(windows)]
        for start, end in events:  # back to back: each window's start waits for the previous window's kernels
            start.record()
            for _ in range(steps):
                loss = step(x, y)
            end.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step(x, y)
            seconds.append(time.perf_counter() - t0)
    rates = [steps * x.shape[0] / s for s in seconds]
    median = statistics.median(rates)
    return {"images/s": median, "images/s_min": min(rates), "images/s_max": max(rates), "images/s_windows": rates,
            "ms/step": 1e3 * x.shape[0] / median, "windows": windows, "peak_mem_mb": peak_memory_mb(device),
            "loss": float(loss), "warmup_s": warmup_s, "gpu_start": gpu_start, "gpu_end": gpu_state(device)}


def achieved(flops_image: float | None, images_per_s: float, name: str, precision: Precision) -> dict:
    if not flops_image:
        return {"TFLOP/s": None, "fraction_of_peak": None, "peak_TFLOP/s": None}
    tflops = flops_image * images_per_s / 1e12
    peak = peak_tflops(name, precision)
    return {"TFLOP/s": tflops, "fraction_of_peak": tflops / peak if peak else None, "peak_TFLOP/s": peak}
