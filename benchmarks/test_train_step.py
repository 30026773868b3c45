"""Joint training step: the trainer's own TrainStep, images/s, peak memory, model FLOPs and the
fraction of the device's peak, for the plain-PyTorch baseline (fp32 eager, + AMP, + torch.compile)
and the full engine.

CPU (``test_train_step_cpu``): the digits preset at batch 64 and the CIFAR preset at batch 8. One
case per preset times the engine as ``python -m jdm_fast.train --amp`` runs it on this CPU (bf16
autocast where the CPU has native bf16, else fp32; uncompiled; channels-last), and in the same
rounds, interleaved (pytest-benchmark's per-round setup), one step of each baseline variant:
CPU speed drifts over minutes on shared machines, so only steps timed side by side are compared.
extra_info holds each baseline's median, and the engine's ratios to them. The compiled baselines
(baseline_amp_compile, baseline_strong) join with ``--cpu-compile`` (minutes of compilation on 2
cores).
GPU (``test_train_step_gpu``): the CIFAR preset at batch 256, one case per variant (ratios to
baseline_fp32, baseline_strong and baseline_amp_compile of the same session; benchmarks/gpu_check
times it too).
"""
from __future__ import annotations

import statistics
import time

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
        if not tb.is_engine(variant):
            pytest.skip("torch.compile on CPU takes minutes to compile: pass --cpu-compile to measure it")
        compile = False
    x, y = tb.synthetic_batch(preset, batch, device)
    tb.reset_memory(device)  # the previous variant's model and optimizer are gone with its test
    step = tb.make_step(model, precision, compile, preset, keyed=tb.is_engine(variant),
                        channels_last=tb.channels_last(variant), channels_last_input=tb.channels_last_input(variant))

    def run():
        loss = step(x, y)
        tb.synchronize(device)
        return loss

    with tb.settings(variant, device):  # baseline_strong: cudnn.benchmark on CUDA, restored after
        loss = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)  # the last round's loss
    assert torch.isfinite(loss), f"{variant}: non-finite loss {loss}"
    ips = batch / benchmark.stats.stats.mean
    case = f"{preset}/{device.type}/{batch}"
    _images_per_s[(case, variant)] = ips
    name = tb.device_name(device)
    base = _images_per_s.get((case, tb.BASELINE))
    ratios = {f"ratio_vs_{b}": ips / _images_per_s[(case, b)] if (case, b) in _images_per_s and tb.is_engine(variant)
              else None for b in (tb.GOAL_BASELINE, tb.COMPILE_BASELINE)}
    flops = _flops_per_image(preset, device)
    benchmark.extra_info.update({
        "device": name, **tb.versions(), "preset": preset, "batch": batch, "variant": variant,
        "precision": precision.name, "compile": compile, "images/s": ips,
        "peak_mem_mb": tb.peak_memory_mb(device), "GFLOP/image": flops / 1e9,
        **tb.achieved(flops, ips, name, precision),
        "ratio_vs_baseline_fp32": ips / base if base else None, **ratios,
    })


CPU_CASES = [("digits", 64), ("cifar10", 8)]


@pytest.mark.parametrize("preset,batch", CPU_CASES, ids=[f"{p}-{b}" for p, b in CPU_CASES])
def test_train_step_cpu(benchmark, preset, batch, request):
    device = torch.device("cpu")
    x, y = tb.synthetic_batch(preset, batch, device)
    baselines = ["baseline_fp32", "baseline_amp"] + (["baseline_amp_compile", "baseline_strong"]
                                                     if request.config.getoption("--cpu-compile") else [])
    steps, precisions = {}, {}
    for variant in baselines + ["engine"]:
        model, precision, compile = tb.build(variant, preset, device)
        compile = compile and (variant != "engine")  # the engine as the trainer runs it on CPUs: uncompiled
        steps[variant] = tb.make_step(model, precision, compile, preset, keyed=tb.is_engine(variant),
                                      channels_last=tb.channels_last(variant),
                                      channels_last_input=tb.channels_last_input(variant))
        precisions[variant] = precision
        steps[variant](x, y)  # the first step outside the rounds (compilation, allocator warm-up)
    times: dict[str, list[float]] = {v: [] for v in baselines}

    def baselines_round():  # pytest-benchmark's untimed setup: one timed step of each baseline
        for v in baselines:
            t0 = time.perf_counter()
            steps[v](x, y)
            times[v].append(time.perf_counter() - t0)

    rounds, warmup = (7, 1) if preset == "digits" else (5, 1)
    loss = benchmark.pedantic(lambda: steps["engine"](x, y), setup=baselines_round, rounds=rounds, iterations=1,
                              warmup_rounds=warmup)
    assert torch.isfinite(loss), f"engine: non-finite loss {loss}"
    engine_s = benchmark.stats.stats.median
    medians = {v: statistics.median(t[warmup:]) for v, t in times.items()}
    name = tb.device_name(device)
    flops = _flops_per_image(preset, device)
    ips = batch / engine_s
    benchmark.extra_info.update({
        "device": name, **tb.versions(), "preset": preset, "batch": batch, "variant": "engine",
        "precision": precisions["engine"].name, "compile": False, "step": steps["engine"].trainer.describe(),
        "images/s": ips, "GFLOP/image": flops / 1e9, **tb.achieved(flops, ips, name, precisions["engine"]),
        **{f"{v}_ms": 1e3 * m for v, m in medians.items()},
        **{f"ratio_vs_{v}": m / engine_s for v, m in medians.items()},
    })


@pytest.mark.gpu
@pytest.mark.parametrize("variant", tb.VARIANTS)
def test_train_step_gpu(benchmark, cuda_device, variant):
    _run(benchmark, variant, "cifar10", 256, cuda_device, True, rounds=10, warmup=3)
