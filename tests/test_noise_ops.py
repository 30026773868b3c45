"""The noise-schedule ops of jdm_fast._C (csrc/) against independent references.

References: float64 closed forms written here, Random123's published Philox4x32-10 known-answer
vectors, the NumPy stream reference (jdm_fast.ops.philox) and the moments of N(0, 1).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.ops import noise as N
from jdm_fast.ops.philox import normal_stream, philox4x32_10

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = N.OPS


# The ops do their math in float32 and round the result to the data's dtype once, so an output may
# differ from the float64 closed form (evaluated on the same, already rounded, inputs) by
#   - its rounding to dtype: the unit roundoff u = eps(dtype) / 2 (2^-24, 2^-11, 2^-8) relative,
#   - the float32 arithmetic before it: a handful of operations and float32 coefficients, each off
#     by at most 2^-24 relative; F32_MATH allows 32 of them (1.9e-6; on the CPU the float32 outputs
#     use at most 0.16 of it, the DDIM step with its clipped-x0 eps recomputation).
# For float16/bfloat16 the bounds sit between the correctly rounded result and one extra rounding:
# the closed form rounded to dtype uses ~0.6 of them, the ops up to 0.8 (the sampler steps with
# Philox noise, which the kernels round to dtype), and q_sample computed op by op in low precision
# 1.2x to 400x (test_the_bounds_reject_low_precision_math).
F32_MATH = 32 * 2.0**-24


def tol(dtype, roundings: int = 1) -> float:
    """Relative bound of an output rounded ``roundings`` times to dtype from float32 math (2 when
    comparing two such outputs, e.g. CUDA against the CPU)."""
    return roundings * torch.finfo(dtype).eps / 2 + F32_MATH


def close(out, ref, dtype, extra: float = 0.0, roundings: int = 1, scale: float = 1.0):
    """|out - ref| <= (tol(dtype, roundings) + extra) (scale + |ref|) elementwise.

    ``extra``: known additional relative error of the inputs (e.g. float32 schedule tables).
    ``scale``: the magnitude below which the bound stops shrinking with |ref|. The data here is
    N(0, 1), so 1; outputs much smaller than 1 (the gradient of a mean) pass their own magnitude,
    max|ref|, or the bound would not notice a relative error of the size of the values."""
    out, ref = out.double(), ref.double()
    bound = (tol(dtype, roundings) + extra) * (scale + ref.abs())
    assert out.shape == ref.shape
    assert bool(((out - ref).abs() <= bound).all()), float(((out - ref).abs() / (scale + ref.abs())).max())


def grad_scale(ref) -> float:
    return float(ref.abs().max())


@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion(make_betas("jdm_linear", 1000))


def data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


def rand_t(b, T, seed=1):
    t = torch.randint(0, T, (b,), generator=torch.Generator().manual_seed(seed))
    t[0], t[-1] = 0, T - 1  # both ends of the table
    return t


def table(d, name, dtype=F64):
    return getattr(d, name).to(dtype)


# ------------------------------------------------------------------------------ the build
def test_extension_built():
    assert N.HAS_C, "jdm_fast._C did not import: the ops run their fallbacks"


def test_cuda_kernels_compiled_when_the_build_had_nvcc():
    has_cuda_kernel = [torch._C._dispatch_has_kernel_for_dispatch_key(f"jdm_fast::{op}", "CUDA") for op in OPS]
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"jdm_fast::{op}", "CPU") for op in OPS)
    assert has_cuda_kernel == [N.WITH_CUDA] * len(OPS)  # all or nothing, as the module says
    if shutil.which("nvcc") and torch.version.cuda and os.environ.get("JDM_FAST_CUDA") != "0":
        assert N.WITH_CUDA, "nvcc and a CUDA torch were present, but the CUDA kernels were not built"


# ------------------------------------------------------------------------------ Philox stream
KAT = [  # Random123 kat_vectors: philox4x32 10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_reference_philox_matches_random123(ctr, key, want):
    assert tuple(int(w) for w in philox4x32_10(ctr, key)) == want


def philox_noise(shape, seed, offset, dtype=torch.float32):
    x = torch.zeros(shape, dtype=dtype)
    t = torch.zeros(shape[0], dtype=torch.long)
    one = torch.ones(1, dtype=F64)
    return N.q_sample_philox(x, t, one, one, seed, offset)[1]


@pytest.mark.parametrize("seed,offset", [(0, 0), (7, 3), (2**63 + 5, 13), (-1, 1_000_001), (123456789, 2**40 + 2)])
def test_cpu_stream_equals_the_documented_reference(seed, offset):
    z = philox_noise((37, 3, 7), seed, offset).flatten().numpy()
    ref = normal_stream(seed, offset, z.size)
    np.testing.assert_allclose(z, ref, rtol=2e-7, atol=2e-7)
    assert (z == ref).mean() > 0.999  # bit-identical but for rare libm last-ulp cases


def test_stream_is_a_function_of_seed_and_offset():
    a = philox_noise((8, 3, 5, 5), seed=11, offset=0)
    assert torch.equal(a, philox_noise((8, 3, 5, 5), seed=11, offset=0))
    assert not torch.equal(a, philox_noise((8, 3, 5, 5), seed=12, offset=0))
    flat = a.flatten()
    for k in (1, 2, 3, 4, 75, 599):
        shifted = philox_noise((1, 600 - k), seed=11, offset=k).flatten()
        assert torch.equal(shifted, flat[k:])


def test_a_shard_draws_exactly_its_slice_of_the_global_batch():
    full = philox_noise((8, 3, 4, 4), seed=5, offset=1000)
    per = 3 * 4 * 4
    for rank, (lo, hi) in enumerate([(0, 3), (3, 8)]):
        part = philox_noise((hi - lo, 3, 4, 4), seed=5, offset=1000 + lo * per)
        assert torch.equal(part, full[lo:hi]), rank


def test_stream_moments_of_a_million_draws():
    z = philox_noise((1000, 1000), seed=2024, offset=17).double().flatten()
    n = z.numel()
    m = z.mean()
    c = z - m
    var = c.square().mean()
    skew = c.pow(3).mean() / var**1.5
    kurt = c.pow(4).mean() / var**2
    # 6 standard errors: sqrt(1/n), sqrt(2/n), sqrt(6/n), sqrt(24/n)
    assert abs(float(m)) < 6 * math.sqrt(1 / n)
    assert abs(float(var) - 1) < 6 * math.sqrt(2 / n)
    assert abs(float(skew)) < 6 * math.sqrt(6 / n)
    assert abs(float(kurt) - 3) < 6 * math.sqrt(24 / n)
    assert float(z.abs().max()) < 6.8  # the stream's largest possible value is ~6.77
    assert torch.isfinite(z).all()


# ------------------------------------------------------------------------------ q_sample
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_dtype", [torch.float32, F64])
def test_q_sample_closed_form(diff, dtype, table_dtype):
    x0, noise = data((9, 3, 5, 6), dtype), data((9, 3, 5, 6), dtype, seed=1)
    t = rand_t(9, 1000)
    a = table(diff, "sqrt_alphas_cumprod", table_dtype)
    b = table(diff, "sqrt_one_minus_alphas_cumprod", table_dtype)
    out = N.q_sample(x0, t, a, b, noise)
    assert out.dtype == dtype
    abar = diff.alphas_cumprod[t].view(-1, 1, 1, 1)  # float64 closed form
    ref = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    # float32 tables round each coefficient once more (relative 2^-24) than the float64 closed form
    close(out, ref, dtype, extra=2.0**-24 if table_dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("dtype,low", [(torch.float32, torch.float16), (torch.float16, torch.float16),
                                       (torch.bfloat16, torch.bfloat16)],
                         ids=["float32-data-float16-math", "float16-per-op", "bfloat16-per-op"])
def test_the_bounds_reject_low_precision_math(diff, dtype, low):
    """close() is no rubber stamp: it accepts the float64 closed form rounded once to dtype but
    rejects q_sample computed without float32 math (each product and the sum rounded to ``low``),
    one or two roundings more than the ops make."""
    x0, noise = data((9, 3, 5, 6), dtype), data((9, 3, 5, 6), dtype, seed=1)
    abar = diff.alphas_cumprod[rand_t(9, 1000)].view(-1, 1, 1, 1)
    ref = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    close(ref.to(dtype), ref, dtype)
    sloppy = abar.sqrt().to(low) * x0.to(low) + (1 - abar).sqrt().to(low) * noise.to(low)
    with pytest.raises(AssertionError):
        close(sloppy.to(dtype), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_philox_is_q_sample_with_its_noise(diff, dtype):
    x0 = data((6, 2, 9, 9), dtype)
    t = rand_t(6, 1000)
    a, b = diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod
    x_t, z = N.q_sample_philox(x0, t, a, b, seed=3, offset=5)
    assert x_t.dtype == z.dtype == dtype
    assert torch.equal(z, torch.from_numpy(normal_stream(3, 5, z.numel())).reshape(z.shape).to(dtype))
    assert torch.equal(x_t, N.q_sample(x0, t, a, b, z))


def test_q_sample_gradients(diff):
    x0 = data((4, 3, 4, 4), torch.float32).requires_grad_()
    noise = data((4, 3, 4, 4), torch.float32, 2).requires_grad_()
    t = rand_t(4, 1000)
    w = data((4, 3, 4, 4), torch.float32, 3)
    (N.q_sample(x0, t, diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod, noise) * w).sum().backward()
    abar = diff.alphas_cumprod[t].view(-1, 1, 1, 1)
    close(x0.grad, abar.sqrt() * w.double(), torch.float32)
    close(noise.grad, (1 - abar).sqrt() * w.double(), torch.float32)
    x1 = x0.detach().clone().requires_grad_()
    N.q_sample_philox(x1, t, diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod, 1, 0)[0].mul(w).sum().backward()
    close(x1.grad, abar.sqrt() * w.double(), torch.float32)


def test_non_contiguous_inputs(diff):
    x0 = data((4, 6, 6, 3), torch.float32).permute(0, 3, 1, 2)  # channels_last view
    noise = data((4, 3, 6, 6), torch.float32, 1).contiguous(memory_format=torch.channels_last)
    t = rand_t(4, 1000)
    out = N.q_sample(x0, t, diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod, noise)
    abar = diff.alphas_cumprod[t].view(-1, 1, 1, 1)
    close(out, abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double(), torch.float32)


# ------------------------------------------------------------------------------ eps_mse
@pytest.mark.parametrize("dtype,noise_dtype", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32),
                                                                          (torch.float16, torch.float32)])
def test_eps_mse_and_gradient(dtype, noise_dtype):
    shape = (5, 3, 17, 19)  # not a multiple of any vector width
    eps_hat = data(shape, dtype).requires_grad_()
    noise = data(shape, noise_dtype, 1)
    loss = N.eps_mse(eps_hat, noise)
    assert loss.dtype == torch.float32 and loss.shape == ()
    diff64 = eps_hat.detach().double() - noise.double()
    ref = diff64.square().mean()
    assert abs(float(loss.detach()) - float(ref)) <= 1e-6 * float(ref)
    (3.0 * loss).backward()
    ref_grad = 3.0 * 2 * diff64 / diff64.numel()  # ~1e-3: the bound scales with it
    close(eps_hat.grad, ref_grad, dtype, scale=grad_scale(ref_grad))


def test_eps_mse_noise_gradient_and_large_input():
    eps_hat = data((3, 40_000), torch.float32)
    noise = data((3, 40_000), torch.float32, 1).requires_grad_()
    N.eps_mse(eps_hat, noise).backward()
    ref_grad = -2 * (eps_hat.double() - noise.detach().double()) / noise.numel()  # ~1e-5
    close(noise.grad, ref_grad, torch.float32, scale=grad_scale(ref_grad))


def test_eps_mse_is_deterministic_across_thread_counts():
    eps_hat, noise = data((64, 3, 32, 32), torch.float32), data((64, 3, 32, 32), torch.float32, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = N.eps_mse(eps_hat, noise)
        torch.set_num_threads(max(2, before))
        many = N.eps_mse(eps_hat, noise)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


# ------------------------------------------------------------------------------ sampler steps
def ancestral_ref(d, x_t, eps, t, clip, variance, z):
    """float64 closed form of one DDPM ancestral step."""
    x, e = x_t.double(), eps.double()
    sh = (-1,) + (1,) * (x.dim() - 1)
    abar, abar_prev = d.alphas_cumprod[t].view(sh), d.alphas_cumprod_prev[t].view(sh)
    beta = d.betas[t].view(sh)
    x0 = (x - (1 - abar).sqrt() * e) / abar.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = beta * abar_prev.sqrt() / (1 - abar) * x0 + (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar) * x
    var = beta * (1 - abar_prev) / (1 - abar) if variance == "fixed_small" else beta
    out = mean + (t > 0).view(sh) * var.sqrt() * (0 if z is None else z.double())
    return out


def ancestral_args(d, variance):
    log_var = d.posterior_log_variance_clipped if variance == "fixed_small" else d.fixed_large_log_variance
    return (d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod, d.posterior_mean_coef1,
            d.posterior_mean_coef2, log_var)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("noise_kind", ["tensor", "philox", "none"])
def test_ancestral_step_closed_form(diff, dtype, clip, variance, noise_kind):
    shape = (8, 3, 6, 5)
    x_t, eps = data(shape, dtype) * 1.5, data(shape, dtype, 1)
    t = rand_t(8, 1000)
    t[1] = 1  # posterior variance at t = 1 (the clipped log's source)
    kw = {}
    z = None
    if noise_kind == "tensor":
        z = kw["noise"] = data(shape, dtype, 2)
    elif noise_kind == "philox":
        kw = {"seed": 99, "offset": 7}
        z = torch.from_numpy(normal_stream(99, 7, x_t.numel())).reshape(shape)
    out = N.ancestral_step(x_t, eps, t, *ancestral_args(diff, variance), clip, **kw)
    assert out.dtype == dtype
    ref = ancestral_ref(diff, x_t, eps, t, clip, variance, z)
    # the x0 estimate divides by sqrt(abar_t) (~1e-2 at t = T-1), but the posterior mean scales it by
    # coef1 ~ beta_t sqrt(abar_{t-1}) / (1 - abar_t), so the step keeps the plain float32 tolerance
    close(out, ref, dtype)


def ddim_ref(abar, x_t, eps, t, t_prev, eta, clip, z):
    x, e = x_t.double(), eps.double()
    sh = (-1,) + (1,) * (x.dim() - 1)
    a = abar[t].view(sh)
    ap = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones((), dtype=F64)).view(sh)
    x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
        e = (x - a.sqrt() * x0) / (1 - a).sqrt()
    sigma = eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
    out = ap.sqrt() * x0 + (1 - ap - sigma**2).clamp(min=0).sqrt() * e
    return out if z is None else out + sigma * z.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta,noise_kind", [(0.0, "none"), (1.0, "tensor"), (0.5, "philox")])
def test_ddim_step_closed_form(diff, dtype, clip, eta, noise_kind):
    shape = (7, 2, 5, 5)
    x_t, eps = data(shape, dtype), data(shape, dtype, 1)
    t = torch.tensor([999, 980, 500, 20, 5, 1, 0])
    t_prev = torch.tensor([979, 960, 480, 0, -1, 0, -1])
    kw, z = {}, None
    if noise_kind == "tensor":
        z = kw["noise"] = data(shape, dtype, 2)
    elif noise_kind == "philox":
        kw = {"seed": 4, "offset": 1}
        z = torch.from_numpy(normal_stream(4, 1, x_t.numel())).reshape(shape)
    out = N.ddim_step(x_t, eps, t, t_prev, diff.alphas_cumprod, eta, clip, **kw)
    close(out, ddim_ref(diff.alphas_cumprod, x_t, eps, t, t_prev, eta, clip, z), dtype)


def test_samplers_use_the_fused_steps_and_match_the_reference_backend(diff):
    from jdm_fast.diffusion import sample_ancestral, sample_ddim
    from jdm_fast.ops import backend

    def model(x, t):
        return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).float() / 1000

    runs = {}
    for name in ("auto", "reference"):
        with backend(name):
            runs[name] = (
                sample_ancestral(model, diff, (3, 1, 4, 4), steps=20, generator=torch.Generator().manual_seed(0)),
                sample_ddim(model, diff, (3, 1, 4, 4), steps=10, eta=0.5, generator=torch.Generator().manual_seed(0)),
            )
    for fused, ref in zip(runs["auto"], runs["reference"]):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ registration
def _sample_args(diff):
    x = data((3, 2, 4, 4), torch.float32)
    e = data((3, 2, 4, 4), torch.float32, 1).requires_grad_()
    t = torch.tensor([0, 500, 999])
    a, b = diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod
    return {
        "q_sample": (x.clone().requires_grad_(), t, a, b, e),
        "q_sample_philox": (x.clone().requires_grad_(), t, a, b, 3, 4),
        "q_sample_keyed": (x.clone().requires_grad_(), t, a, b, 3, torch.tensor(5)),
        "counter_timesteps": (torch.tensor(7), 3, 5, 1000),
        "counter_uniform": (torch.tensor(7), 3, 11, 5, 6),
        "eps_mse": (e, x),
        "ancestral_step": (x, e.detach(), t, *ancestral_args(diff, "fixed_small"), True, None, 5, 0),
        "ddim_step": (x, e.detach(), t, torch.tensor([-1, 400, 900]), diff.alphas_cumprod, 0.5, True, None, 2, 0),
    }


@pytest.mark.parametrize("op", ["q_sample", "q_sample_philox", "q_sample_keyed", "counter_timesteps",
                                "counter_uniform", "eps_mse", "ancestral_step", "ddim_step"])
def test_opcheck(diff, op):
    torch.library.opcheck(getattr(torch.ops.jdm_fast, op), _sample_args(diff)[op])


def test_fullgraph_compile_traces_the_ops(diff):
    torch._dynamo.reset()
    a, b = diff.sqrt_alphas_cumprod.float(), diff.sqrt_one_minus_alphas_cumprod.float()

    def loss_fn(x0, t, w):
        x_t, noise = N.q_sample_philox(x0, t, a, b, 0, 0)
        return N.eps_mse(x_t * w, noise)

    x0, t = data((4, 3, 8, 8), torch.float32), rand_t(4, 1000)
    w1 = torch.ones((), requires_grad=True)
    w2 = torch.ones((), requires_grad=True)
    eager = loss_fn(x0, t, w1)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x0, t, w2)
    assert torch.equal(eager, compiled)
    eager.backward()
    compiled.backward()
    assert torch.equal(w1.grad, w2.grad)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("how", ["wrapper", "torch.ops", "python-checks"])
def test_bad_input_raises_clearly(diff, how):
    """The checks run once, in the op: the C++ ones (called through the wrapper or torch.ops) and
    the Python mirror of the Python ops (here under backend("reference"); the fallback ops run it
    too, see the test below) reject the same inputs with the same kind of message."""
    from jdm_fast.ops import backend
    ops = torch.ops.jdm_fast if how == "torch.ops" else N
    with backend("reference" if how == "python-checks" else "auto"):
        _bad_inputs(diff, ops)


def _bad_inputs(diff, ops):
    x = data((4, 3, 4, 4), torch.float32)
    a, b = diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\bt\b.*\[0, 1000\)"):  # C++: "t[3] = 1000 lies outside [0, 1000)"
        ops.q_sample(x, torch.tensor([0, 1, 2, 1000]), a, b, x)
    with pytest.raises(ValueError, match=r"\bt\b.*\[0, 1000\)"):
        ops.q_sample(x, torch.tensor([0, -1, 2, 3]), a, b, x)
    with pytest.raises(ValueError, match="noise must have the shape"):
        ops.q_sample(x, t, a, b, x[:, :2])
    with pytest.raises(TypeError, match="noise has dtype"):
        ops.q_sample(x, t, a, b, x.half())
    with pytest.raises(TypeError, match="int64"):
        ops.q_sample(x, t.int(), a, b, x)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        ops.q_sample(x, t[:3], a, b, x)
    with pytest.raises(ValueError, match="length"):
        ops.q_sample(x, t, a, b[:10], x)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.q_sample(x.double(), t, a, b, x.double())
    with pytest.raises(ValueError, match="offset"):
        ops.q_sample_philox(x, t, a, b, 0, -1)
    with pytest.raises(ValueError, match="first_example must be >= 0"):
        ops.q_sample_keyed(x, t, a, b, 0, torch.tensor(-1))
    with pytest.raises(TypeError, match="first_example must be an int64 tensor"):
        ops.q_sample_keyed(x, t, a, b, 0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="first_example must hold one value"):
        ops.counter_timesteps(torch.tensor([1, 2]), 0, 4, 10)
    with pytest.raises(ValueError, match="num_timesteps must be >= 1"):
        ops.counter_timesteps(torch.tensor(1), 0, 4, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        ops.counter_uniform(torch.tensor(1), 0, 3, -1, 4)
    with pytest.raises(ValueError, match="tag must be in"):
        ops.counter_uniform(torch.tensor(1), 0, 2**32, 2, 4)
    with pytest.raises(TypeError, match="noise must have eps_hat's dtype"):
        ops.eps_mse(x.half(), x.bfloat16())
    args = ancestral_args(diff, "fixed_small")
    with pytest.raises(ValueError, match="either noise or seed"):
        ops.ancestral_step(x, x, t, *args, True, noise=x, seed=1, offset=0)
    with pytest.raises(ValueError, match="t_prev"):
        ops.ddim_step(x, x, t, torch.tensor([-1, 1, 1, 2]), diff.alphas_cumprod, 0.0, True, noise=None, seed=None,
                      offset=0)
    with pytest.raises(ValueError, match="eta"):
        ops.ddim_step(x, x, t, t - 1, diff.alphas_cumprod, 1.5, True, noise=None, seed=None, offset=0)


def test_pure_pytorch_fallback_when_the_extension_is_missing(tmp_path, diff):
    """JDM_FAST_DISABLE_C=1 stands in for a build without _C: same op names, same results."""
    script = tmp_path / "fallback.py"
    script.write_text(
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from jdm_fast.ops import noise as N\n"
        "    import jdm_fast.diffusion\n"
        "msgs = [str(x.message) for x in w if 'jdm_fast._C is not available' in str(x.message)]\n"
        "assert not N.HAS_C and len(msgs) == 1, msgs\n"
        "from jdm_fast.diffusion import GaussianDiffusion, make_betas\n"
        "d = GaussianDiffusion(make_betas('jdm_linear', 1000))\n"
        "x = torch.linspace(-1, 1, 96).reshape(2, 3, 4, 4)\n"
        "t = torch.tensor([3, 900])\n"
        "x_t, z = torch.ops.jdm_fast.q_sample_philox(x, t, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod, 9, 2)\n"
        "loss = torch.ops.jdm_fast.eps_mse(x_t, z)\n"
        "f = torch.tensor(3)\n"
        "keyed = torch.ops.jdm_fast.q_sample_keyed(x, t, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod, 9, f)\n"
        "ts = torch.ops.jdm_fast.counter_timesteps(f, 9, 6, 1000)\n"
        "u = torch.ops.jdm_fast.counter_uniform(f, 9, 4, 6, 5)\n"
        f"torch.save({{'x_t': x_t, 'z': z, 'loss': loss, 'keyed': keyed, 'ts': ts, 'u': u}}, {str(tmp_path / 'out.pt')!r})\n"
        # the fallback ops' fake implementations and autograd agree with them, as the compiled ones'
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_noise_ops import _sample_args\n"
        "for name, args in _sample_args(d).items():\n"
        "    torch.library.opcheck(getattr(torch.ops.jdm_fast, name), args)\n"
        # the fallback ops check their arguments as the compiled ones do
        "from test_noise_ops import _bad_inputs\n"
        "_bad_inputs(d, torch.ops.jdm_fast)\n"
    )
    env = dict(os.environ, JDM_FAST_DISABLE_C="1")
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=300)
    got = torch.load(tmp_path / "out.pt")
    x = torch.linspace(-1, 1, 96).reshape(2, 3, 4, 4)
    t = torch.tensor([3, 900])
    x_t, z = N.q_sample_philox(x, t, diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod, 9, 2)
    assert torch.equal(got["z"], z)
    torch.testing.assert_close(got["x_t"], x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["loss"], N.eps_mse(x_t, z), rtol=1e-6, atol=0)
    f = torch.tensor(3)
    assert torch.equal(got["keyed"][1], N.q_sample_keyed(x, t, diff.sqrt_alphas_cumprod,
                                                         diff.sqrt_one_minus_alphas_cumprod, 9, f)[1])
    assert torch.equal(got["ts"], N.counter_timesteps(f, 9, 6, 1000))
    assert torch.equal(got["u"], N.counter_uniform(f, 9, 4, 6, 5))


def test_stream_offset_stays_symbolic_under_torch_compile(diff):
    """The trainer's noise offset changes every step: the schema's SymInt offset stays symbolic, so
    one dynamic graph serves every step (an ``int`` would specialize the graph and recompile it)."""
    from torch._dynamo.utils import counters

    a, b = diff.sqrt_alphas_cumprod.float(), diff.sqrt_one_minus_alphas_cumprod.float()
    x, t = data((2, 1, 4, 4), torch.float32), torch.tensor([3, 700])

    def step_noise(x, step):
        x_t, z = N.q_sample_philox(x, t, a, b, 5, step * x.numel())
        out = N.ddim_step(x_t, z, t, t - 1, diff.alphas_cumprod, 1.0, True, seed=7, offset=step * x.numel())
        return out + N.ancestral_step(x_t, z, t, *ancestral_args(diff, "fixed_small"), True, seed=7, offset=step)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step_noise, backend="eager")
    for step in range(5):
        torch.testing.assert_close(compiled(x, step), step_noise(x, step), rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] <= 2  # the first, specialized one and one dynamic graph
    torch._dynamo.reset()


@pytest.mark.parametrize("clip", [True, False])
def test_sampler_steps_propagate_nan(diff, clip):
    """A diverging model stays visible: NaN is not clipped away (as torch.clamp)."""
    x_t, eps = data((2, 1, 4, 4), torch.float32), data((2, 1, 4, 4), torch.float32, 1)
    eps[1, 0, 2, 3] = float("nan")
    t = torch.tensor([10, 500])
    out = N.ancestral_step(x_t, eps, t, *ancestral_args(diff, "fixed_small"), clip)
    assert torch.isnan(out).sum() == 1 and torch.isnan(out[1, 0, 2, 3])
    out = N.ddim_step(x_t, eps, t, t - 5, diff.alphas_cumprod, 0.0, clip)
    assert torch.isnan(out).sum() == 1 and torch.isnan(out[1, 0, 2, 3])


# ------------------------------------------------------------------------------ keyed draws
@pytest.mark.parametrize("seed,first", [(0, 0), (11, 48), (2**63 + 5, 2**33 + 7), (-3, 1_000_003)])
def test_counter_draws_equal_the_documented_reference(seed, first):
    """counter_timesteps / counter_uniform equal the NumPy reference (jdm_fast.ops.philox) bit for bit."""
    from jdm_fast.ops import philox
    f = torch.tensor(first)
    t = N.counter_timesteps(f, seed, 37, 1000)
    assert t.dtype == torch.int64 and t.shape == (37,)
    np.testing.assert_array_equal(t.numpy(), philox.counter_timesteps(seed & (2**64 - 1), first, 37, 1000))
    for width in (30, 203):  # not multiples of 4; the CPU kernel draws 64 columns at a time (AVX-512)
        u = N.counter_uniform(f, seed, 0x44524F50, 9, width)
        assert u.dtype == torch.float32 and u.shape == (9, width)
        np.testing.assert_array_equal(u.numpy(),
                                      philox.counter_uniform(seed & (2**64 - 1), 0x44524F50, first, 9, width))


def test_seeds_wider_than_64_bits_are_refused_not_wrapped():
    """Seeds are 64-bit: [-2^63, 2^64) are accepted (a negative one is its two's complement, the same
    stream as seed + 2^64); 2^64 and beyond, or below -2^63, raise naming the seed (taken modulo 2^64,
    2^64 would be seed 0's stream) and so does a float seed."""
    x0 = torch.zeros(2, 3)
    t = torch.tensor([1, 2])
    a = torch.linspace(0.9, 0.1, 5, dtype=torch.float64)
    b = (1 - a * a).sqrt()
    f = torch.tensor(4)
    assert torch.equal(N.counter_uniform(f, -1, 7, 2, 5), N.counter_uniform(f, 2**64 - 1, 7, 2, 5))
    N.counter_timesteps(f, -(2**63), 3, 10)
    for bad in (2**64, 2**64 + 5, -(2**63) - 1):
        for call in (lambda s: N.q_sample_philox(x0, t, a, b, s, 0), lambda s: N.counter_timesteps(f, s, 3, 10),
                     lambda s: N.counter_uniform(f, s, 7, 2, 5)):
            with pytest.raises(ValueError, match=rf"seed must lie in \[-2\^63, 2\^64\) \(64 bits\), got {bad}"):
                call(bad)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        N.counter_timesteps(f, 3.0, 3, 10)


def test_counter_draws_are_per_example_and_uniform():
    """Rows depend on the global example only (a shard draws its slice), tags and seeds separate the
    streams, and the values are uniform: timesteps over [0, T) and uniforms over [0, 1)."""
    full = N.counter_uniform(torch.tensor(100), 5, 1, 20, 7)
    assert torch.equal(N.counter_uniform(torch.tensor(108), 5, 1, 12, 7), full[8:])
    assert not torch.equal(N.counter_uniform(torch.tensor(100), 5, 2, 20, 7), full)
    assert not torch.equal(N.counter_uniform(torch.tensor(100), 6, 1, 20, 7), full)
    t = N.counter_timesteps(torch.tensor(0), 9, 200_000, 50)
    counts = torch.bincount(t, minlength=50).double()
    chi2 = ((counts - 4000) ** 2 / 4000).sum().item()
    assert t.min() >= 0 and t.max() < 50 and chi2 < 100  # 49 degrees of freedom: p(chi2 > 100) < 1e-4
    u = N.counter_uniform(torch.tensor(0), 9, 3, 1000, 1000).double()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_keyed_is_q_sample_philox_at_the_example_offset(diff, dtype):
    x, t = data((5, 3, 7, 5), dtype), rand_t(5, 1000)
    a, b = diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod
    xt, z = N.q_sample_keyed(x, t, a, b, 21, torch.tensor(13))
    want_xt, want_z = N.q_sample_philox(x, t, a, b, 21, 13 * 3 * 7 * 5)
    assert torch.equal(z, want_z) and torch.equal(xt, want_xt)
    x = x.float().requires_grad_()
    N.q_sample_keyed(x, t, a, b, 21, torch.tensor(13))[0].sum().backward()
    torch.testing.assert_close(x.grad, a[t].float().view(-1, 1, 1, 1).expand_as(x))


def test_keyed_ops_reference_backend_matches_the_kernels(diff):
    from jdm_fast.ops import backend
    x, t = data((4, 3, 4, 4), torch.float32), rand_t(4, 1000)
    a, b = diff.sqrt_alphas_cumprod, diff.sqrt_one_minus_alphas_cumprod
    f = torch.tensor(9)
    with backend("reference"):
        ref = (N.q_sample_keyed(x, t, a, b, 2, f), N.counter_timesteps(f, 2, 4, 1000), N.counter_uniform(f, 2, 5, 4, 9))
    got = (N.q_sample_keyed(x, t, a, b, 2, f), N.counter_timesteps(f, 2, 4, 1000), N.counter_uniform(f, 2, 5, 4, 9))
    assert torch.equal(got[0][1], ref[0][1]) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[0][0], ref[0][0], rtol=1e-6, atol=1e-6)


def test_backend_settings_are_read_once_and_the_wrappers_follow_them(monkeypatch):
    """JDM_FAST_BACKEND is read at import (Settings), not per call; backend(...) and replaced
    SETTINGS route the wrappers to the Python ops."""
    from jdm_fast.ops import backends
    from jdm_fast.ops.backends import Settings

    assert Settings.from_environment({}) == Settings("auto", False)
    assert Settings.from_environment({"JDM_FAST_BACKEND": " Reference ", "TRITON_INTERPRET": "1"}) == \
        Settings("reference", True)
    with pytest.raises(ValueError, match="JDM_FAST_BACKEND must be one of"):
        Settings.from_environment({"JDM_FAST_BACKEND": "cuda-magic"})
    before = backends.current_backend()
    monkeypatch.setenv("JDM_FAST_BACKEND", "reference" if before != "reference" else "auto")
    assert backends.current_backend() == before

    calls = []
    monkeypatch.setattr(N, "_python_eps_mse", lambda e, z: calls.append("python") or torch.zeros(()))
    x = data((2, 3), torch.float32)
    monkeypatch.setattr(backends, "SETTINGS", Settings(backend="auto"))
    N.eps_mse(x, x)
    with backends.backend("reference"):
        N.eps_mse(x, x)
    assert calls == ["python"]
    monkeypatch.setattr(backends, "SETTINGS", Settings(backend="reference"))
    N.eps_mse(x, x)
    with backends.backend("auto"):
        N.eps_mse(x, x)
    assert calls == ["python"] * 2


# ------------------------------------------------------------------------------ CUDA (gpu_check)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("offset", [0, 3, 4096 + 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_philox_stream_equals_the_cpu_stream(dtype, offset):
    shape = (33, 3, 32, 32)
    x = data(shape, dtype)
    t = rand_t(33, 1000)
    d = GaussianDiffusion(make_betas("jdm_linear", 1000))
    a, b = d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod
    cpu_xt, cpu_z = N.q_sample_philox(x, t, a, b, 77, offset)
    gpu_xt, gpu_z = N.q_sample_philox(x.cuda(), t.cuda(), a.cuda(), b.cuda(), 77, offset)
    if dtype == torch.float32:  # CUDA's float64 libm vs the CPU's: at most a last-ulp difference
        torch.testing.assert_close(gpu_z.cpu(), cpu_z, rtol=2e-7, atol=2e-7)
    assert (gpu_z.cpu() == cpu_z).float().mean() > 0.999
    close(gpu_xt.cpu(), cpu_xt.double(), dtype, roundings=2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_match_float64_closed_forms(diff, dtype):
    shape = (64, 3, 17, 16)  # 816 per example: vector paths; odd batch elements below
    x, eps, z = data(shape, dtype), data(shape, dtype, 1), data(shape, dtype, 2)
    t = rand_t(64, 1000)
    t_prev = (t - 50).clamp(min=-1)
    cu = lambda v: v.cuda()  # noqa: E731
    abar = diff.alphas_cumprod[t].view(-1, 1, 1, 1)
    out = N.q_sample(cu(x), cu(t), cu(diff.sqrt_alphas_cumprod), cu(diff.sqrt_one_minus_alphas_cumprod), cu(z))
    close(out.cpu(), abar.sqrt() * x.double() + (1 - abar).sqrt() * z.double(), dtype)
    for noise_dtype in {dtype, torch.float32}:
        e = cu(eps).requires_grad_()
        loss = N.eps_mse(e, cu(z).to(noise_dtype))
        ref = (eps.double() - z.to(noise_dtype).double()).square().mean()
        assert abs(float(loss) - float(ref)) <= 1e-5 * float(ref)
        loss.backward()
        ref_grad = 2 * (eps.double() - z.to(noise_dtype).double()) / eps.numel()
        close(e.grad.cpu(), ref_grad, dtype, scale=grad_scale(ref_grad))
    for variance in ("fixed_small", "fixed_large"):
        args = [cu(a) for a in ancestral_args(diff, variance)]
        out = N.ancestral_step(cu(x), cu(eps), cu(t), *args, True, cu(z))
        close(out.cpu(), ancestral_ref(diff, x, eps, t, True, variance, z), dtype)
    out = N.ddim_step(cu(x), cu(eps), cu(t), cu(t_prev), cu(diff.alphas_cumprod), 0.7, True, cu(z))
    close(out.cpu(), ddim_ref(diff.alphas_cumprod, x, eps, t, t_prev, 0.7, True, z), dtype)
    # Philox noise inside the steps: the same stream as the CPU kernels
    cpu = N.ddim_step(x, eps, t, t_prev, diff.alphas_cumprod, 1.0, False, seed=5, offset=9)
    gpu = N.ddim_step(cu(x), cu(eps), cu(t), cu(t_prev), cu(diff.alphas_cumprod), 1.0, False, seed=5, offset=9)
    close(gpu.cpu(), cpu.double(), dtype, roundings=2)
    # unaligned views (no 16-byte vector path) give the same results
    xs, zs = cu(data((65,) + shape[1:], dtype))[1:], cu(data((65,) + shape[1:], dtype, 3))[1:]
    out = N.q_sample(xs, cu(t), cu(diff.sqrt_alphas_cumprod), cu(diff.sqrt_one_minus_alphas_cumprod), zs)
    close(out.cpu(), abar.sqrt() * xs.cpu().double() + (1 - abar).sqrt() * zs.cpu().double(), dtype)


@pytest.mark.gpu
@needs_cuda
def test_cuda_eps_mse_is_deterministic():
    e, z = torch.randn(256, 3, 32, 32, device="cuda"), torch.randn(256, 3, 32, 32, device="cuda")
    first = N.eps_mse(e, z)
    assert all(torch.equal(first, N.eps_mse(e, z)) for _ in range(5))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("first", [0, 5, 2**33 + 3])
def test_cuda_keyed_draws_equal_the_cpu(first):
    """On CUDA the keyed ops read first_example on the device and give the CPU kernels' values."""
    d = GaussianDiffusion(make_betas("jdm_linear", 1000))
    a, b = d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod
    for shape in ((33, 3, 32, 32), (6, 1, 5, 3)):  # 4-aligned examples (vector path) and not
        x, t = data(shape, torch.bfloat16), rand_t(shape[0], 1000)
        f = torch.tensor(first)
        cpu_xt, cpu_z = N.q_sample_keyed(x, t, a, b, 77, f)
        gpu_xt, gpu_z = N.q_sample_keyed(x.cuda(), t.cuda(), a.cuda(), b.cuda(), 77, f.cuda())
        assert (gpu_z.cpu() == cpu_z).float().mean() > 0.999
        close(gpu_xt.cpu(), cpu_xt.double(), torch.bfloat16, roundings=2)
    f = torch.tensor(first)
    assert torch.equal(N.counter_timesteps(f.cuda(), 3, 300, 1000).cpu(), N.counter_timesteps(f, 3, 300, 1000))
    assert torch.equal(N.counter_uniform(f.cuda(), 3, 9, 70, 37).cpu(), N.counter_uniform(f, 3, 9, 70, 37))
