"""Timing helpers shared by the GPU benchmark suites."""
from __future__ import annotations

import torch


def runner(fn, args, mode: str):
    """A no-argument callable running ``fn(*args)`` forward only, or forward + backward of a fixed
    upstream gradient shaped like the output (= like ``args[0]`` for the ops benchmarked here)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*args)
    else:
        dy = torch.randn_like(args[0])

        def run():
            fn(*args).backward(dy)
    return run


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


PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM bandwidth, vendor figures


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """The device's peak memory bandwidth in GB/s where known (CUDA devices in PEAK_GBPS)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)
