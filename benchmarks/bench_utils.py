"""Timing helpers shared by the GPU benchmark suites."""
from __future__ import annotations

import torch


def runner(fn, args, mode: str):
    """A no-argument callable running ``fn(*args)`` forward only, or forward + backward of a fixed
    upstream gradient shaped like the output (= like ``args[0]`` for the ops benchmarked here).
    Forward + backward clears the inputs' gradients first, so no call times an accumulation into
    the previous call's gradients (a training step's backward writes them fresh)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*args)
    else:
        dy = torch.randn_like(args[0])
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

        def run():
            for a in leaves:
                a.grad = None
            fn(*args).backward(dy)
    return run


def synced(run, device):
    """``run`` followed by a device synchronize: what pytest-benchmark times for GPU cases, so its
    table measures the work, not the launch."""
    if torch.device(device).type != "cuda":
        return run

    def run_synced():
        out = run()
        torch.cuda.synchronize()
        return out
    return run_synced


def cuda_ms(run, iters: int = 10) -> float | None:
    """Mean milliseconds per call after warm-up, timed with CUDA events; None when the callable
    raises (e.g. an SDPA backend that does not support the shape or dtype)."""
    try:
        for _ in range(3):
            run()
    except RuntimeError:
        return None
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


# The floors a GPU case is measured against (DESIGN.md, "two numbers"): HBM bandwidth and dense
# bf16/fp16 tensor-core rate, by the vendor's datasheet and as measured on this workplace's H200
# (a large device-to-device copy: ~4.3 TB/s; an 8192^3 bf16 matmul on random data: ~790 TFLOP/s).
DEVICE_CEILINGS = {  # name substring: (vendor GB/s, measured GB/s, vendor TFLOP/s, measured TFLOP/s)
    "H200": (4800.0, 4300.0, 989.0, 790.0),
    "H100": (3350.0, None, 989.0, None),
    "A100": (2039.0, None, 312.0, None),
}


def _ceilings(device) -> tuple | None:
    """The DEVICE_CEILINGS row of a CUDA device; None for CPUs and unknown GPUs."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DEVICE_CEILINGS.items() if k in name), None)


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """The device's peak memory bandwidth in GB/s (vendor figure) where known."""
    ceil = _ceilings(device)
    return None if ceil is None else ceil[0]


def lower_bound(device, bytes_moved: float, flops: float = 0.0) -> dict:
    """The case's lower-bound time on this device, ``max(bytes / bandwidth, flops / rate)``, from the
    vendor figures (``bound_ms``) and from the measured ceilings where known (``bound_measured_ms``);
    empty on CPUs and unknown GPUs. ``fraction_of_bound`` is filled in by :func:`with_fraction`."""
    ceil = _ceilings(device)
    if ceil is None:
        return {}
    bw, bw_meas, rate, rate_meas = ceil

    def floor(b, r):
        return None if b is None or r is None else 1e3 * max(bytes_moved / (b * 1e9), flops / (r * 1e12))
    return {"bound_ms": floor(bw, rate), "bound_measured_ms": floor(bw_meas or bw, rate_meas or rate)}


def with_fraction(bound: dict, ours_ms: float | None) -> dict:
    """``bound`` plus ``fraction_of_bound`` = measured-ceiling bound / our time (1.0 = at the floor)."""
    if not bound or not ours_ms:
        return bound
    return {**bound, "fraction_of_bound": bound["bound_measured_ms"] / ours_ms}
