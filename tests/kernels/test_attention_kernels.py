"""Flash-style attention Triton kernels: interpreter parity, packed-qkv strides, determinism, AOT compile.

On CPU these run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is imported);
on a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 (set before triton is imported)",
                allow_module_level=True)

from jdm_fast.kernels import attention as at  # noqa: E402
from jdm_fast.kernels.attention import (  # noqa: E402
    ALL_CONFIGS, KERNEL_KINDS, AttnConfig, attention_bwd, attention_fwd, pick_config,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 5e-3, BF16: 2e-2}  # max|out - ref| / max|ref| against float64
GRAD_TOL_FACTOR = 3  # dq / dk / dv go through two more low-precision dots


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(at, "_empty", lambda shape, device, dtype=torch.float32:
                        torch.full(shape, float("nan"), device=device, dtype=dtype))


def reference(q, k, v, scale):
    """float64 softmax attention: (o, lse); autograd through it gives the reference grads."""
    s = (q @ k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ v
    return o, lse


def rel_err(out, ref, scale=None):
    """max|out - ref| / max|ref| (or / max(max|ref|, scale), when given); NaN or inf never passes."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output (NaN never passes)"
    denom = ref.abs().max() if scale is None else max(ref.abs().max(), torch.as_tensor(scale))
    return ((out - ref).abs().max() / denom.clamp_min(1e-30)).item()


def ds_term_sizes(q, k, v, do, scale):
    """Sizes of the terms dQ and dK are sums of: scale * |P| (|dP| + |delta|) times |K| or |Q|.

    dS = P * (dP - delta) cancels exactly where a row's softmax is one-hot (L = 1: dQ = dK = 0
    whatever the inputs), so their error is measured against the size of what cancels.
    """
    with torch.no_grad():
        p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
        o = p @ v
        t = scale * p * ((do @ v.transpose(-1, -2)).abs() + (do * o).sum(-1, keepdim=True).abs())
        return (t @ k.abs()).max().item(), (t.transpose(-1, -2) @ q.abs()).max().item()


def make_inputs(B, H, L, D, dtype, packed, seed=0):
    """q, k, v, do rounded to ``dtype``. packed: the ADM layout, views of qkv (B, 3, H, D, L)."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(B, 3, H, D, L, generator=g).to(dtype).to(DEVICE)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, H, L, D), stride(-1) = L
        do = torch.randn(B, H, D, L, generator=g).to(dtype).to(DEVICE).transpose(-1, -2)
        assert not q.is_contiguous() or L == 1
    else:
        q, k, v, do = (torch.randn(B, H, L, D, generator=g).to(dtype).to(DEVICE) for _ in range(4))
    return q, k, v, do


def check(B, H, L, D, dtype, packed, config=None):
    q, k, v, do = make_inputs(B, H, L, D, dtype, packed)
    scale = D ** -0.5
    o, lse = attention_fwd(q, k, v, scale, config=config)
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, scale, config=config)

    leaf = lambda t: t.detach().cpu().double().requires_grad_()  # noqa: E731
    qr, kr, vr = leaf(q), leaf(k), leaf(v)
    or_, lser = reference(qr, kr, vr, scale)
    or_.backward(do.cpu().double())

    assert o.dtype == dtype and o.shape == (B, H, L, D) and o.is_contiguous()
    assert lse.dtype == F32 and lse.shape == (B, H, L)
    for g_ in (dq, dk, dv):
        assert g_.dtype == dtype and g_.shape == (B, H, L, D) and g_.is_contiguous()
    tol, gtol = TOL[dtype], TOL[dtype] * GRAD_TOL_FACTOR
    dq_size, dk_size = ds_term_sizes(qr, kr, vr, do.cpu().double(), scale)
    errs = {"o": (rel_err(o, or_), tol), "lse": (rel_err(lse, lser), tol),
            "dq": (rel_err(dq, qr.grad, dq_size), gtol), "dk": (rel_err(dk, kr.grad, dk_size), gtol),
            "dv": (rel_err(dv, vr.grad), gtol)}
    bad = {name: e for name, e in errs.items() if not e[0] <= e[1]}
    assert not bad, f"errors above tolerance (err, tol): {bad} (all: {errs})"


# ------------------------------------------------------------------------------ parity
# (L, D, dtype, packed, H): every L with a couple of D values, dtypes and layouts rotated.
CASES = [
    pytest.param(1, 16, F32, False, 2, id="L1-D16-fp32-contig"),  # a single key and query
    pytest.param(1, 96, BF16, True, 3, id="L1-D96-bf16-packed"),
    pytest.param(7, 40, F16, True, 2, id="L7-D40-fp16-packed"),  # D not a power of two
    pytest.param(7, 64, F32, False, 3, id="L7-D64-fp32-contig"),
    pytest.param(49, 96, F32, True, 2, id="L49-D96-fp32-packed"),  # 7x7 feature map
    pytest.param(49, 16, BF16, False, 2, id="L49-D16-bf16-contig"),
    pytest.param(64, 64, F16, False, 2, id="L64-D64-fp16-contig"),  # exactly one block
    pytest.param(64, 128, BF16, True, 3, id="L64-D128-bf16-packed"),
    pytest.param(100, 40, BF16, False, 2, id="L100-D40-bf16-contig"),  # partial last block
    pytest.param(100, 128, F32, True, 2, id="L100-D128-fp32-packed"),
    pytest.param(100, 256, F16, False, 2, id="L100-D256-fp16-contig"),
    pytest.param(256, 256, F16, True, 2, id="L256-D256-fp16-packed"),  # 16x16 map, largest head dim
    pytest.param(256, 96, F32, False, 2, id="L256-D96-fp32-contig"),
    pytest.param(49, 256, F32, True, 2, id="L49-D256-fp32-packed"),  # fp32 at the largest tile
]


@pytest.mark.parametrize("L,D,dtype,packed,H", CASES)
def test_parity(L, D, dtype, packed, H):
    check(2, H, L, D, dtype, packed)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_parity_small_blocks_many_iterations(dtype):
    """A forced 16x16 tile: every loop iterates several times and both M and N tails are partial."""
    check(2, 2, 37, 24, dtype, True, config=AttnConfig(16, 16, 32, 1, 1))


def test_large_scores_do_not_overflow():
    """Scores of ~1e3: the online softmax must subtract the running max (no exp overflow)."""
    q, k, v, do = make_inputs(1, 2, 33, 32, F32, False, seed=3)
    q = q * 30
    o, lse = attention_fwd(q, k, v, 1.0)
    or_, lser = reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), 1.0)
    assert rel_err(o, or_) <= 1e-4 and rel_err(lse, lser) <= 1e-5
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, 1.0)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()


# ------------------------------------------------------------------------------ determinism
def test_backward_is_bit_identical():
    q, k, v, do = make_inputs(2, 2, 100, 40, F16, True, seed=1)
    o, lse = attention_fwd(q, k, v, 0.2)
    first = attention_bwd(do, q, k, v, o, lse, 0.2)
    second = attention_bwd(do, q, k, v, o, lse, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ configs
def test_pick_config_only_returns_members_of_all_configs():
    assert len(ALL_CONFIGS) == len(set(ALL_CONFIGS))
    seen = set()
    for L in (1, 2, 7, 16, 49, 63, 64, 65, 100, 256, 1024, 4096):
        for D in range(16, 257):
            cfg = pick_config(L, D)
            assert cfg in ALL_CONFIGS, (L, D, cfg)
            assert cfg.block_d >= D and cfg.block_d // 2 < max(D, 16), (D, cfg)  # next power of two
            assert min(cfg.block_m, cfg.block_n) >= 16  # tl.dot needs >= 16
            seen.add(cfg)
    assert seen == set(ALL_CONFIGS), "ALL_CONFIGS lists configs pick_config never returns"


# ------------------------------------------------------------------------------ bad inputs
# The launchers trust their inputs: jdm_fast.ops.attention validates them (tests/test_attention_op.py).
# A forced config is what only a launcher takes: checked here.
def _ok(L=8, D=32):
    return [torch.randn(2, 2, L, D, device=DEVICE) for _ in range(3)]


@pytest.mark.parametrize("config,exc,match", [
    ((64, 64, 32, 4, 2), TypeError, "config must be an AttnConfig"),
    (AttnConfig(64, 64, 16, 4, 2), ValueError, "block_d=16 is smaller than head dim D=32"),
    (AttnConfig(24, 64, 32, 4, 2), ValueError, "block_m=24 must be a power of two"),
])
def test_bad_config_is_named(config, exc, match):
    q, k, v = _ok()
    with pytest.raises(exc, match=match):
        attention_fwd(q, k, v, 0.1, config=config)
    o, lse = attention_fwd(q, k, v, 0.1)
    with pytest.raises(exc, match=match):
        attention_bwd(torch.randn_like(o), q, k, v, o, lse, 0.1, config=config)


# ------------------------------------------------------------------------------ AOT compile
def test_aot_compile_every_kernel_config_dtype_and_target(aot_compile):
    """triton.compile for sm_80 and sm_90 without a GPU: catches what the interpreter lets through.
    scale typed fp64 (what Inductor passes) on every other job, fp32 (the eager JIT) on the rest."""
    jobs = [(kind, i, dt, cap) for cap in (80, 90) for dt in ("fp32", "fp16", "bf16")
            for kind in KERNEL_KINDS for i in range(len(ALL_CONFIGS))]
    jobs = [(*job, {"scale_dtype": "fp64" if n % 2 else "fp32"}) for n, job in enumerate(jobs)]
    records = aot_compile("jdm_fast.kernels.attention", jobs)
    assert len(records) == 2 * 3 * len(KERNEL_KINDS) * len(ALL_CONFIGS)
    for r in records:
        if r["kind"] != "bwd_preprocess":
            # fp16/bf16 dots on tensor cores; fp32 dots are input_precision="ieee" (FMA, no TF32)
            assert r["tensor_core"] == (r["dt"] != "fp32"), r["job"]
