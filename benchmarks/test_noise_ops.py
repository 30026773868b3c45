"""Noise-schedule ops (jdm_fast._C) against the eager PyTorch expression and torch.compile of it.

Each case times ours with pytest-benchmark and both baselines in the same run, and records GB/s
against the bytes floor (every tensor read or written once), the fraction of the device's memory
bandwidth where known, and the ratios to eager and to compile. Shapes: batch x 3 x 32 x 32 (the
CIFAR preset) at batch 256 and larger on the GPU; batch 256 on the CPU.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from bench_utils import cuda_ms, lower_bound, peak_bandwidth_gbs, synced, with_fraction
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.ops import noise as N

_DIFF = GaussianDiffusion(make_betas("jdm_linear", 1000))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or "cpu"


def _tables(device):
    names = ["sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
             "posterior_log_variance_clipped", "alphas_cumprod"]
    return {n: getattr(_DIFF, n).to(device=device, dtype=torch.float32) for n in names}


def _bc(v, x):
    return v.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# Eager PyTorch expressions of the same math (what a user writes without the ops).
def eager_q_sample(x0, t, tb, noise):
    return _bc(tb["sqrt_alphas_cumprod"][t], x0) * x0 + _bc(tb["sqrt_one_minus_alphas_cumprod"][t], x0) * noise


def eager_q_sample_randn(x0, t, tb):
    noise = torch.randn_like(x0)
    return eager_q_sample(x0, t, tb, noise), noise


def eager_mse(eps_hat, noise):
    return F.mse_loss(eps_hat.float(), noise.float())


def eager_ancestral(x, eps, t, tb, noise):
    x0 = (_bc(tb["sqrt_recip_alphas_cumprod"][t], x) * x - _bc(tb["sqrt_recipm1_alphas_cumprod"][t], x) * eps).clamp(-1, 1)
    mean = _bc(tb["posterior_mean_coef1"][t], x) * x0 + _bc(tb["posterior_mean_coef2"][t], x) * x
    sigma = torch.where(t > 0, (0.5 * tb["posterior_log_variance_clipped"][t]).exp(), 0.0)
    return mean + _bc(sigma, x) * noise


def eager_ddim(x, eps, t, t_prev, tb):
    abar = tb["alphas_cumprod"]
    a, ap = abar[t], torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], 1.0)
    x0 = ((x - _bc((1 - a).sqrt(), x) * eps) / _bc(a.sqrt(), x)).clamp(-1, 1)
    eps = (x - _bc(a.sqrt(), x) * x0) / _bc((1 - a).sqrt(), x)
    return _bc(ap.sqrt(), x) * x0 + _bc((1 - ap).sqrt(), x) * eps


def _cases(device, dtype, batch):
    shape = (batch, 3, 32, 32)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=g)
    eps = torch.randn(shape, device=device, dtype=dtype, generator=g)
    z = torch.randn(shape, device=device, dtype=dtype, generator=g)
    t = torch.randint(1, 1000, (batch,), device=device, generator=g)
    t_prev = (t - 20).clamp(min=-1)
    tb = _tables(device)
    n, es = x.numel(), x.element_size()
    a, b = tb["sqrt_alphas_cumprod"], tb["sqrt_one_minus_alphas_cumprod"]
    anc = [tb[k] for k in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                           "posterior_mean_coef2", "posterior_log_variance_clipped")]
    eps_g = eps.detach().clone().requires_grad_()
    eps_g2 = eps.detach().clone().requires_grad_()

    def mse_fb_ours():
        eps_g.grad = None  # no accumulation into the previous call's gradient
        N.eps_mse(eps_g, z).backward()

    def mse_fb_eager(fn=eager_mse):
        eps_g2.grad = None
        fn(eps_g2, z).backward()

    return {  # name: (ours, eager callable factory(fn), eager fn, args, bytes floor)
        "q_sample": (lambda: N.q_sample(x, t, a, b, z), eager_q_sample, (x, t, tb, z), 3 * n * es),
        "q_sample_philox": (lambda: N.q_sample_philox(x, t, a, b, 1, 0), eager_q_sample_randn, (x, t, tb), 3 * n * es),
        "eps_mse_fwd": (lambda: N.eps_mse(eps, z), eager_mse, (eps, z), 2 * n * es),
        "eps_mse_fwd_bwd": (mse_fb_ours, None, mse_fb_eager, 5 * n * es),
        "ancestral_step": (lambda: N.ancestral_step(x, eps, t, *anc, True, z), eager_ancestral, (x, eps, t, tb, z), 4 * n * es),
        "ddim_step": (lambda: N.ddim_step(x, eps, t, t_prev, tb["alphas_cumprod"], 0.0, True), eager_ddim,
                      (x, eps, t, t_prev, tb), 3 * n * es),
    }


def _cpu_ms(run, iters: int = 5) -> float:
    run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) * 1e3 / iters


def _time(device, run):
    return cuda_ms(run, iters=20) if device.type == "cuda" else _cpu_ms(run)


_COMPILED: dict = {}


def _compiled(fn):
    """One torch.compile wrapper per eager function (it recompiles per shape and dtype itself)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _baselines(device, case):
    _, fn, args, _ = case
    if fn is None:  # fwd+bwd: args is a callable taking the loss function
        eager = _time(device, lambda: args(eager_mse))
        compiled = _time(device, lambda: args(_compiled(eager_mse)))
        return eager, compiled
    with torch.no_grad():
        eager = _time(device, lambda: fn(*args))
        compiled = _time(device, lambda: _compiled(fn)(*args))
    return eager, compiled


OPS = ["q_sample", "q_sample_philox", "eps_mse_fwd", "eps_mse_fwd_bwd", "ancestral_step", "ddim_step"]


def _bench(benchmark, device, dtype, batch, op):
    case = _cases(device, dtype, batch)[op]
    ours = case[0]
    eager_ms, compiled_ms = _baselines(device, case)
    run = synced(ours, device)
    with torch.no_grad() if op != "eps_mse_fwd_bwd" else torch.enable_grad():
        benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 5, iterations=5 if device.type == "cuda" else 1,
                           warmup_rounds=1)
    ours_ms = (cuda_ms(ours, iters=50) if device.type == "cuda" else benchmark.stats.stats.mean * 1e3)
    gbps = case[3] / (ours_ms * 1e-3) / 1e9
    peak = peak_bandwidth_gbs(device)
    benchmark.extra_info.update({
        "device": _device_name(device), "torch": torch.__version__,
        "triton": getattr(__import__("triton"), "__version__", None) if device.type == "cuda" else None,
        "op": op, "dtype": str(dtype).replace("torch.", ""), "shape": [batch, 3, 32, 32],
        "ours_ms": ours_ms, "eager_ms": eager_ms, "compile_ms": compiled_ms,
        "ratio_vs_eager": eager_ms / ours_ms, "ratio_vs_compile": compiled_ms / ours_ms,
        "GB/s": gbps, "bytes_floor": case[3],
        "fraction_of_peak_bw": None if peak is None else gbps / peak,
        **with_fraction(lower_bound(device, case[3]), ours_ms),
    })


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_noise_op_cpu(benchmark, op, dtype):
    benchmark.group = f"noise ops cpu {str(dtype).replace('torch.', '')}"
    _bench(benchmark, torch.device("cpu"), dtype, 256, op)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,batch", [(torch.float32, 256), (torch.bfloat16, 256), (torch.bfloat16, 4096)],
                         ids=["fp32-256", "bf16-256", "bf16-4096"])
def test_noise_op_gpu(benchmark, cuda_device, op, dtype, batch):
    benchmark.group = f"noise ops gpu {str(dtype).replace('torch.', '')} batch {batch}"
    _bench(benchmark, cuda_device, dtype, batch, op)
