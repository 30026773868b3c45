"""Fused GroupNorm + scale-shift + SiLU against eager PyTorch and torch.compile of the same code.

Shapes: the CIFAR preset's ResBlock norms at batch 256 (issue 3). Each case times the baselines in
the same run and records GB/s against the bytes floor (forward: read x + write y = 2 passes;
forward+backward: + read x, read dy, write dx = 5 passes) and the ratios to eager / compile.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench_utils import cuda_ms, lower_bound, peak_bandwidth_gbs, runner, synced, with_fraction
from jdm_fast.ops import backend, group_norm_silu

SHAPES = [(256, 128, 32, 32), (256, 256, 16, 16), (256, 256, 8, 8), (256, 256, 4, 4), (256, 384, 32, 32),
          (256, 512, 16, 16)]
GROUPS = 32


def eager(x, w, b, scale, shift):
    y = F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype), 1e-5)  # CUDA group_norm wants one dtype
    return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def ours(x, w, b, scale, shift):
    with backend("triton"):
        return group_norm_silu(x, GROUPS, w, b, 1e-5, scale=scale, shift=shift)


_compiled = torch.compile(eager)


def _apex_ms(x, params, mode):
    """apex's contrib GroupNorm (+SiLU, channels_last, no FiLM: apex has none) where installed."""
    try:
        from apex.contrib.group_norm import GroupNorm
    except ImportError:
        return None
    c = x.shape[1]
    gn = GroupNorm(GROUPS, c, eps=1e-5, affine=True, act="silu").to(x.device, x.dtype)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(mode != "fwd")
    return cuda_ms(runner(gn, [xc], mode))


def _inputs(shape, dtype, device, grad):
    n, c = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
    params = [torch.randn(c, device=device), torch.randn(c, device=device),
              torch.randn(n, c, device=device, dtype=dtype), torch.randn(n, c, device=device, dtype=dtype)]
    for p in params:
        p.requires_grad_(grad)
    return x, params


def _peak_mb(run) -> float:
    """Peak CUDA memory of one call above what is already allocated (activations saved for backward)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_gpu(benchmark, cuda_device, shape, dtype, mode):
    x, params = _inputs(shape, dtype, cuda_device, grad=mode != "fwd")
    run = runner(ours, [x, *params], mode)
    eager_ms = cuda_ms(runner(eager, [x, *params], mode))
    compile_ms = cuda_ms(runner(_compiled, [x, *params], mode))
    ours_ms = cuda_ms(run)
    apex_ms = _apex_ms(x, params, mode)
    peak = {"ours_peak_mb": _peak_mb(run), "eager_peak_mb": _peak_mb(runner(eager, [x, *params], mode))}
    benchmark.pedantic(synced(run, x.device), rounds=10, iterations=5, warmup_rounds=2)
    passes = 2 if mode == "fwd" else 5
    gbs = passes * x.numel() * x.element_size() / (ours_ms * 1e-3) / 1e9
    peak_bw = peak_bandwidth_gbs(cuda_device)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(cuda_device), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "ours_ms": ours_ms, "eager_ms": eager_ms,
        "compile_ms": compile_ms, "speedup_vs_eager": eager_ms / ours_ms,
        "speedup_vs_compile": compile_ms / ours_ms, "apex_ms (no FiLM)": apex_ms, "GB/s": gbs,
        "fraction_of_peak_bw": gbs / peak_bw if peak_bw else None, **peak,
        **with_fraction(lower_bound(cuda_device, passes * x.numel() * x.element_size()), ours_ms),
    })


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["eager", "reference", "cpu_kernel"])
def test_group_norm_silu_cpu(benchmark, provider, mode):
    """CPU, bf16, channels-last (the engine's CPU layout), the digits preset's largest norm: the C++
    kernel (the default on CPU tensors) against the unfused eager code it replaces and against the
    reference path (backend("reference"))."""
    g = torch.Generator().manual_seed(0)
    shape, dtype = (64, 96, 28, 28), torch.bfloat16
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(96, generator=g), torch.randn(96, generator=g)
    s, sh = (torch.randn(64, 96, generator=g).to(dtype) for _ in range(2))
    grad = mode != "fwd"
    args = [t.requires_grad_(grad) for t in (x, w, b, s, sh)]
    if provider == "eager":
        fn = eager
    else:
        def fn(*a):
            with backend("reference" if provider == "reference" else "auto"):
                return group_norm_silu(a[0], GROUPS, a[1], a[2], 1e-5, scale=a[3], shift=a[4])
    benchmark(runner(fn, args, mode))
    benchmark.extra_info.update({"device": "cpu", "torch": torch.__version__,
                                 "images/s": shape[0] / benchmark.stats.stats.mean})
