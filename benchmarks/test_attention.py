"""Fused attention against torch SDPA with each of its backends at the UNet's attention shapes.

The ADM block hands q, k, v as strided views of one packed qkv tensor: ours reads them in place;
SDPA gets them made contiguous inside the timed call (its fused backends need a unit last-dim
stride), so each side pays what it needs. A backend that rejects a shape/dtype records None. TFLOP/s counts 4*B*H*L*L*D for the
forward (two matmuls) and 3.5x that for forward+backward (the backward does 2.5x the forward).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_utils import cuda_ms, lower_bound, runner, synced, with_fraction
from jdm_fast.ops import attention, backend

SHAPES = [(256, 4, 256, 64), (256, 4, 64, 64), (256, 4, 16, 64),  # CIFAR preset, batch 256
          (64, 4, 1024, 64), (64, 4, 256, 128)]  # 64x64 preset, batch 64
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _packed(shape, dtype, device, grad):
    b, h, length, d = shape
    qkv = torch.randn(b, 3, h, d, length, device=device, dtype=dtype, requires_grad=grad)
    return qkv, [qkv[:, i].transpose(-1, -2) for i in range(3)]


def _ours(q, k, v):
    with backend("triton"):
        return attention(q, k, v)


def _sdpa(name):
    def fn(q, k, v):
        # SDPA's fused backends need a unit last-dim stride, which ADM's packed qkv views lack:
        # the copies it needs are part of its cost (ours reads the views in place).
        with sdpa_kernel([SDPA_BACKENDS[name]]):
            return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return fn


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_gpu(benchmark, cuda_device, shape, dtype, mode):
    qkv, views = _packed(shape, dtype, cuda_device, grad=mode != "fwd")
    run = runner(_ours, views, mode)
    ours_ms = cuda_ms(run)
    sdpa_ms = {name: cuda_ms(runner(_sdpa(name), views, mode)) for name in SDPA_BACKENDS}
    benchmark.pedantic(synced(run, cuda_device), rounds=10, iterations=3, warmup_rounds=1)
    b, h, length, d = shape
    flops = 4 * b * h * length * length * d * (1 if mode == "fwd" else 3.5)
    timed = {k: v for k, v in sdpa_ms.items() if v is not None}
    best = min(timed, key=timed.get) if timed else None
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(cuda_device), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "ours_ms": ours_ms, "TFLOP/s": flops / (ours_ms * 1e-3) / 1e12,
        **{f"sdpa_{k}_ms": v for k, v in sdpa_ms.items()}, "best_sdpa": best,
        "speedup_vs_best_sdpa": timed[best] / ours_ms if best else None,
        # bytes: q, k, v read and o written (forward); + do read, dq, dk, dv written (backward)
        **with_fraction(lower_bound(cuda_device, (4 if mode == "fwd" else 8) * b * h * length * d * qkv.element_size(),
                                    flops), ours_ms),
    })


@pytest.mark.parametrize("provider", ["reference", "sdpa_math"])
def test_attention_cpu(benchmark, provider):
    """CPU: the reference path (SDPA's default CPU kernel) against SDPA's math backend."""
    _, views = _packed((8, 4, 64, 32), torch.float32, "cpu", grad=False)
    if provider == "reference":
        def fn():
            with backend("reference"):
                attention(*views)
    else:
        def fn():
            _sdpa("math")(*views)
    benchmark(fn)
    benchmark.extra_info.update({"device": "cpu", "torch": torch.__version__})
