"""Joint training step: images/s, peak memory, model FLOPs and the fraction of the device's peak,
for the plain-PyTorch baseline (fp32 eager, + AMP, + torch.compile) and the full engine.

Each case records its ratio to ``baseline_fp32`` (and the engine's to ``baseline_amp_compile``)
measured in the same session: the variants run in that order and share a module-level cache.
CPU: the default (digits) preset at batch 16; torch.compile variants need ``--cpu-compile``
(about 2.5 minutes of compilation each on a 2-core CPU, and the training loop keeps compile off
on CPUs by default), so the CPU engine runs the fused-op model with AMP, uncompiled.
GPU: the CIFAR preset at batch 256 (benchmarks/gpu_check measures 200 steps of it instead).
"""
from __future__ import annotations

import pytest
import torch

import train_bench as tb

_images_per_s: dict[tuple[str, str], float] = {}  # (case, variant) -> images/s of this session
_flops: dict[tuple[str, str], float] = {}


def _flops_per_image(preset: str, device: torch.device) -> float:
    key = (preset, device.type)
    if key not in _flops:
        _flops[key] = tb.flops_per_image(preset, device)
    return _flops[key]


def _run(benchmark, variant, preset, batch, device, compile_ok, rounds, warmup):
    model, precision, compile = tb.build(variant, preset, device)
    if compile and not compile_ok:
        if variant != "engine":
            pytest.skip("torch.compile on CPU takes minutes to compile: pass --cpu-compile to measure it")
        compile = False
    x, y = tb.synthetic_batch(preset, batch, device)
    tb.reset_memory(device)  # the previous variant's model and optimizer are gone with its test
    step = tb.make_step(model, precision, compile, preset, keyed=tb.is_engine(variant),
                        channels_last=tb.channels_last(variant, device))

    def run():
        loss = step(x, y)
        tb.synchronize(device)
        return loss

    loss = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)  # the last round's loss
    assert torch.isfinite(loss), f"{variant}: non-finite loss {loss}"
    ips = batch / benchmark.stats.stats.mean
    case = f"{preset}/{device.type}/{batch}"
    _images_per_s[(case, variant)] = ips
    name = tb.device_name(device)
    base, goal = _images_per_s.get((case, tb.BASELINE)), _images_per_s.get((case, tb.GOAL_BASELINE))
    flops = _flops_per_image(preset, device)
    benchmark.extra_info.update({
        "device": name, **tb.versions(), "preset": preset, "batch": batch, "variant": variant,
        "precision": precision.name, "compile": compile, "images/s": ips,
        "peak_mem_mb": tb.peak_memory_mb(device), "GFLOP/image": flops / 1e9,
        **tb.achieved(flops, ips, name, precision),
        "ratio_vs_baseline_fp32": ips / base if base else None,
        "ratio_vs_baseline_amp_compile": ips / goal if goal and variant == "engine" else None,
    })


@pytest.mark.parametrize("variant", tb.VARIANTS[:4])
def test_train_step_cpu(benchmark, variant, request):
    _run(benchmark, variant, "digits", 16, torch.device("cpu"), request.config.getoption("--cpu-compile"),
         rounds=5, warmup=2)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", tb.VARIANTS)
def test_train_step_gpu(benchmark, cuda_device, variant):
    _run(benchmark, variant, "cifar10", 256, cuda_device, True, rounds=10, warmup=3)
