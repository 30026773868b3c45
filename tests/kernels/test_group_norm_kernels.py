"""Fused GroupNorm + FiLM + SiLU Triton kernels: interpreter parity, layouts, determinism, AOT compile.

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

from jdm_fast.kernels import group_norm as gn  # noqa: E402
from jdm_fast.kernels.group_norm import ALL_CONFIGS, GNConfig, group_norm_bwd, group_norm_fwd, pick_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EPS = 1e-5


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(gn, "_empty_like", lambda t: torch.full_like(t, float("nan")))
    monkeypatch.setattr(gn, "_empty", lambda shape, device, dtype=torch.float32:
                        torch.full(shape, float("nan"), device=device, dtype=dtype))


def reference(x, w, b, s, sh, groups, act):
    """float64 forward on CPU: (y, mean, rstd); autograd through it gives the reference grads."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1)
    var = ((xg - mean[..., None]) ** 2).mean(-1)
    rstd = 1 / torch.sqrt(var + EPS)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if xhat.requires_grad:
        xhat.retain_grad()  # its grad, dxhat, sets the scale of dx's error (see check)
    y = xhat
    if w is not None:
        y = y * w[:, None, None]
    if b is not None:
        y = y + b[:, None, None]
    if s is not None:
        y = y * (1 + s[:, :, None, None])
    if sh is not None:
        y = y + sh[:, :, None, None]
    if act:
        y = torch.nn.functional.silu(y)
    return y, mean, rstd, xhat


def rel_err(out, ref, scale=None):
    """max|out - ref| / max|ref| (or / scale, when given)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output (NaN never passes)"
    denom = ref.abs().max() if scale is None else torch.as_tensor(scale)
    return ((out - ref).abs().max() / denom.clamp_min(1e-30)).item()


def looped_config(cg: int, hw: int) -> GNConfig:
    """A looped config with chunks smaller than the group, so loops iterate and tails are masked."""
    return GNConfig(False, max(1, gn._next_pow2(cg) // 2), max(1, gn._next_pow2(hw) // 2), 1)


def make_inputs(shape, dtype, channels_last, film, affine=(True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w_ = shape
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)  # nonzero mean: exercises centring
    pdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32  # both param dtypes covered
    w = torch.randn(c, generator=g).to(pdt) if affine[0] else None
    b = torch.randn(c, generator=g).to(pdt) if affine[1] else None
    s = sh = None
    if film:
        s = (0.5 * torch.randn(c, n, generator=g)).to(dtype).t()  # (N, C), non-contiguous strides
        sh = torch.randn(n, c, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # dy stays NCHW: a different layout
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731  (.to keeps layout and strides)
    return dev(x), dev(w), dev(b), dev(s), dev(sh), dev(dy)


def check(shape, groups, dtype, channels_last, film, act, config=None, affine=(True, True)):
    check_inputs(*make_inputs(shape, dtype, channels_last, film, affine), groups, act, config)


def check_inputs(x, w, b, s, sh, dy, groups, act, config=None):
    """Forward and every gradient of the launchers against the float64 reference: y, the
    statistics and dx within the tolerance of x's dtype, each parameter gradient within that of
    its own dtype (TOL; an fp32 dscale of fp16 x is fp32 math on exact inputs)."""
    shape, dtype = tuple(x.shape), x.dtype
    y, mean, rstd = group_norm_fwd(x, w, b, s, sh, groups, EPS, act, config=config)
    grads = group_norm_bwd(dy, x, w, b, s, sh, mean, rstd, groups, act, config=config)

    leaf = lambda t: None if t is None else t.detach().cpu().double().requires_grad_()  # noqa: E731
    xr, wr, br, sr, shr = (leaf(t) for t in (x, w, b, s, sh))
    yr, mr, rr, xhat = reference(xr, wr, br, sr, shr, groups, act)
    yr.backward(dy.cpu().double())

    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (shape[0], groups)
    assert y.stride() == x.stride() and grads[0].stride() == x.stride()  # x's layout: NCHW or channels_last
    errs = {"y": rel_err(y, yr), "mean": rel_err(mean, mr), "rstd": rel_err(rstd, rr)}
    tols = dict.fromkeys(errs, TOL[dtype])
    for name, got, inp, ref in zip(("dx", "dweight", "dbias", "dscale", "dshift"), grads,
                                   (x, w, b, s, sh), (xr, wr, br, sr, shr)):
        if inp is None:
            assert got is None, f"{name} must be None when its input is None"
            continue
        assert got.dtype == inp.dtype and got.shape == inp.shape, name
        scale = None
        if name == "dx":
            # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) cancels to ~0 in tiny groups
            # (2 elements: xhat = +-1 whatever x is): measure against its terms' size, rstd * |dxhat|.
            terms = rr.detach().repeat_interleave(shape[1] // groups, 1)[:, :, None, None] * xhat.grad.abs()
            scale = max(ref.grad.abs().max().item(), terms.max().item())
        errs[name] = rel_err(got, ref.grad, scale)
        tols[name] = TOL[dtype] if name == "dx" else TOL[got.dtype]
    bad = {k: (v, tols[k]) for k, v in errs.items() if not v <= tols[k]}
    assert not bad, f"errors above their tolerance (error, tol): {bad} (all: {errs})"


# ------------------------------------------------------------------------------ parity
FULL_SHAPES = [
    pytest.param((2, 32, 7, 7), 8, id="2x32x7x7_g8"),  # odd spatial size, 4 channels per group
    pytest.param((1, 6, 1, 1), 3, id="1x6x1x1_g3"),  # 1x1 spatial, 2-element groups
]
SUBSET_SHAPES = [
    pytest.param((3, 5, 4, 4), 5, id="3x5x4x4_g5"),  # one channel per group
    pytest.param((2, 64, 8, 8), 1, id="2x64x8x8_g1"),  # the whole C is one group
    pytest.param((1, 4, 28, 28), 2, id="1x4x28x28_g2"),  # HW = 784, not a power of 2
    pytest.param((1, 32, 64, 64), 2, id="1x32x64x64_g2"),  # 65,536 elements per group: looped path
]
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.float16, torch.bfloat16)]
# (dtype, channels_last, film, act): a representative subset of the product for the larger shapes
SUBSET_COMBOS = [
    pytest.param(torch.float32, False, True, True, id="fp32-nchw-film-silu"),
    pytest.param(torch.bfloat16, True, True, True, id="bf16-cl-film-silu"),
    pytest.param(torch.float16, False, False, False, id="fp16-nchw-plain-identity"),
    pytest.param(torch.float32, True, False, True, id="fp32-cl-plain-silu"),
]
PATHS = ["auto", "looped"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act", [True, False], ids=["silu", "identity"])
@pytest.mark.parametrize("film", [True, False], ids=["film", "plain"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", FULL_SHAPES)
def test_parity_full_product(shape, groups, dtype, channels_last, film, act, path):
    cg, hw = shape[1] // groups, shape[2] * shape[3]
    check(shape, groups, dtype, channels_last, film, act, None if path == "auto" else looped_config(cg, hw))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,channels_last,film,act", SUBSET_COMBOS)
@pytest.mark.parametrize("shape,groups", SUBSET_SHAPES)
def test_parity_subset(shape, groups, dtype, channels_last, film, act, path):
    cg, hw = shape[1] // groups, shape[2] * shape[3]
    auto = pick_config(cg, hw)
    if path == "looped" and not auto.single_pass:
        pytest.skip("the automatic config is already the looped kernel")
    check(shape, groups, dtype, channels_last, film, act, auto if path == "auto" else looped_config(cg, hw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_group_picks_looped_and_matches(dtype):
    """A group just over one 4096-element tile (4 channels x 33 x 33) gets the looped config, whose
    last HW chunk is partial; what the launcher then computes (config=None) matches float64."""
    assert pick_config(4, 8 * 8).single_pass
    assert not pick_config(16, 64 * 64).single_pass
    cfg = pick_config(4, 33 * 33)
    assert not cfg.single_pass and (33 * 33) % cfg.block_hw
    check((2, 8, 33, 33), 2, dtype, False, True, True, config=None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "w", "b"])
def test_parity_absent_affine(affine, path):
    cfg = None if path == "auto" else looped_config(4, 49)
    check((2, 16, 7, 7), 4, torch.float32, False, True, True, cfg, affine=affine)


@pytest.mark.parametrize("path", PATHS)
def test_scale_shift_of_other_dtype_and_expanded_strides(path):
    """fp16 x with fp32 scale/shift, shift a stride-0 broadcast over N: forward and every gradient
    (dscale/dshift in fp32, their inputs' dtype) against float64."""
    x, w, b, _, _, dy = make_inputs((2, 8, 5, 5), torch.float16, False, False)
    g = torch.Generator().manual_seed(5)
    s = (0.5 * torch.randn(2, 8, generator=g)).to(DEVICE)
    sh = torch.randn(1, 8, generator=g).to(DEVICE).expand(2, 8)
    check_inputs(x, w, b, s, sh, dy, 2, True, None if path == "auto" else looped_config(4, 25))


def test_large_mean_is_numerically_safe():
    """A big offset with a small spread: E[x^2] - E[x]^2 would lose every digit in fp32."""
    g = torch.Generator().manual_seed(1)
    x = (1000.0 + 0.01 * torch.randn(1, 4, 33, 33, generator=g)).to(DEVICE)
    for cfg in (None, looped_config(2, 33 * 33)):
        _, mean, rstd = group_norm_fwd(x, None, None, None, None, 2, EPS, False, config=cfg)
        _, mr, rr, _ = reference(x.double().cpu(), None, None, None, None, 2, False)
        assert rel_err(rstd, rr) <= 1e-3 and rel_err(mean, mr) <= 1e-6


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("path", PATHS)
def test_backward_parameter_grads_are_bit_identical(path):
    x, w, b, s, sh, dy = make_inputs((4, 16, 6, 6), torch.float32, False, True)
    cfg = None if path == "auto" else looped_config(4, 36)
    _, mean, rstd = group_norm_fwd(x, w, b, s, sh, 4, EPS, True, config=cfg)
    first = group_norm_bwd(dy, x, w, b, s, sh, mean, rstd, 4, True, config=cfg)
    second = group_norm_bwd(dy, x, w, b, s, sh, mean, rstd, 4, True, config=cfg)
    for a, b_ in zip(first[1:3], second[1:3]):
        assert torch.equal(a, b_)


# ------------------------------------------------------------------------------ configs
def test_pick_config_only_returns_members_of_all_configs():
    assert len(ALL_CONFIGS) == len(set(ALL_CONFIGS)) <= 25
    seen = set()
    for cg in list(range(1, 70)) + [96, 128, 256, 512, 1024]:
        for hw in [1, 2, 3, 7, 49, 63, 64, 65, 196, 256, 257, 784, 1024, 1025, 4096, 4097, 16384, 65536]:
            cfg = pick_config(cg, hw)
            assert cfg in ALL_CONFIGS, (cg, hw, cfg)
            if cfg.single_pass:
                assert cfg.block_c >= cg and cfg.block_hw >= hw
            seen.add(cfg)
    assert seen == set(ALL_CONFIGS), "ALL_CONFIGS lists configs pick_config never returns"
    assert not pick_config(16, 64 * 64).single_pass
    assert pick_config(4, 8 * 8).single_pass


# ------------------------------------------------------------------------------ bad inputs
# The launchers trust their inputs: jdm_fast.ops.group_norm_silu validates them (tests/test_group_norm_op.py).
# What only a launcher takes (a forced config) or what would make it store outside a tensor is checked here.
def _ok():
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    return x, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)


@pytest.mark.parametrize("config,exc,match", [
    (GNConfig(True, 1, 64, 1), ValueError, "does not cover"),
    ((True, 2, 64, 1), TypeError, "config must be a GNConfig"),
])
def test_forward_bad_config_is_named(config, exc, match):
    x, w, b = _ok()
    with pytest.raises(exc, match=match):
        group_norm_fwd(x, w, b, None, None, 4, EPS, True, config=config)


def test_layouts_that_do_not_flatten_never_reach_the_kernels():
    """H and W must flatten to one stride; the op copies other layouts, the launcher asserts."""
    x, w, b = _ok()
    with pytest.raises(AssertionError, match="do not flatten"):
        group_norm_fwd(x.transpose(2, 3), w, b, None, None, 4, EPS, True)
    y, mean, rstd = group_norm_fwd(x, w, b, None, None, 4, EPS, True)
    with pytest.raises(AssertionError, match="do not flatten"):
        group_norm_bwd(torch.randn_like(x).transpose(2, 3), x, w, b, None, None, mean, rstd, 4, True)


# ------------------------------------------------------------------------------ AOT compile
def test_aot_compile_every_kernel_config_dtype_and_target(aot_compile):
    """triton.compile for sm_80 and sm_90 without a GPU: catches what the interpreter lets through.
    Every kernel x every config the launcher can pick x dtype; eps typed fp64 (what Inductor
    passes) on every other job, fp32 (the eager JIT) on the rest."""
    jobs = [(kind, i, dt, cap) for cap in (80, 90) for dt in ("fp32", "fp16", "bf16")
            for kind in ("fwd", "bwd") for i in range(len(ALL_CONFIGS))]
    jobs += [("reduce", None, dt, cap) for cap in (80, 90) for dt in ("fp32", "fp16", "bf16")]
    jobs = [(*job, {"eps_dtype": "fp64" if n % 2 else "fp32"}) for n, job in enumerate(jobs)]
    # Triton <= 3.6 compiles integer arguments equal to 1 as constants: one-element groups
    # (CG = HW = 1) with unit strides, as the (5, 32, 1, 1) case of tests/test_gpu.py launches them.
    ones = {"fwd": ("CG", "HW", "sx_c", "sx_hw", "sy_c", "sy_hw"),
            "bwd": ("CG", "HW", "sdy_c", "sdy_hw", "sx_c", "sx_hw", "sdx_c", "sdx_hw")}
    jobs += [(kind, i, dt, 90, {"ones": ones[kind]}) for dt in ("fp32", "bf16") for kind in ("fwd", "bwd")
             for i in range(len(ALL_CONFIGS)) if ALL_CONFIGS[i].single_pass]
    records = aot_compile("jdm_fast.kernels.group_norm", jobs)
    assert len(records) == len(jobs)


# Dtypes of (x, weight, bias, scale, shift) for the mixed-dtype compiles: every pair of these five
# pointers meets every pair of dtypes in some row (a strength-2 covering array, checked below).
PAIRWISE_ROWS = ((0, 0, 2, 1, 1), (0, 1, 1, 0, 0), (1, 2, 0, 0, 1), (1, 1, 2, 2, 1), (2, 0, 0, 2, 0),
                 (1, 0, 1, 0, 2), (0, 2, 1, 2, 2), (1, 2, 2, 1, 0), (2, 1, 1, 1, 1), (0, 1, 0, 1, 2),
                 (2, 2, 2, 0, 2))


def test_aot_compile_mixed_dtypes(aot_compile):
    """The launchers take weight/bias and scale/shift of any float dtype, whatever x's (a bf16
    model's weights, fp32 FiLM outputs with fp16 x, ...): each is a compiled variant of its own.
    Compiled for sm_80 and sm_90: every (x, weight = bias, scale = shift) dtype triple, and rows
    where weight and bias, or scale and shift, differ such that every two of the five pointers
    see every pair of dtypes. Configs rotate over ALL_CONFIGS (the loads' layouts follow the tile)."""
    names = ("fp32", "fp16", "bf16")
    pairs = {(i, j, r[i], r[j]) for r in PAIRWISE_ROWS for i in range(5) for j in range(i + 1, 5)}
    assert len(pairs) == 10 * 9, "PAIRWISE_ROWS must cover every pair of dtypes of every two pointers"
    rows = {(x, wb, wb, ss, ss) for x in range(3) for wb in range(3) for ss in range(3)} | set(PAIRWISE_ROWS)
    rows -= {(x, 0, 0, x, x) for x in range(3)}  # fp32 parameters, FiLM in x's dtype: compiled above
    jobs = []
    for n, row in enumerate(sorted(rows)):
        x, w, b, s, sh = (names[i] for i in row)
        kwargs = {"weight_dtype": w, "bias_dtype": b, "scale_dtype": s, "shift_dtype": sh,
                  "eps_dtype": "fp64" if n % 2 else "fp32"}
        jobs += [(kind, (2 * n + k) % len(ALL_CONFIGS), x, cap, kwargs)
                 for k, kind in enumerate(("fwd", "bwd")) for cap in (80, 90)]
    records = aot_compile("jdm_fast.kernels.group_norm", jobs)
    assert len(records) == len(jobs) == 4 * len(rows)
