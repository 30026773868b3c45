"""Noise-schedule ops: forward noising, the eps loss, and fused sampler steps.

The ops are ``torch.ops.jdm_fast.<name>``, implemented in C++ (CPU) and CUDA by the extension
``jdm_fast._C`` (``csrc/``). This module gives them fake implementations and autograd (so
``torch.compile(fullgraph=True)`` traces them), validates arguments, and exposes typed wrappers.
If ``jdm_fast._C`` was not built (or ``JDM_FAST_DISABLE_C=1``), the same op names are defined
here as ``torch.library.custom_op``s running the pure-PyTorch references below, and one warning
says so. ``jdm_fast.ops.backend("reference")`` also routes the wrappers to the references.

Ops (math in float32 per element, per-example coefficients from the float32/float64 schedule
tables in float64; outputs in the input dtype, except ``eps_mse`` which returns a float32
scalar, as autocast does for ``mse_loss``):

- ``q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise) -> x_t``
  ``x_t = a[t] x0 + b[t] noise`` with per-example int64 ``t``. Differentiable in x0 and noise.
- ``q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset)
  -> (x_t, noise)``: the noise of flat element i is ``stream(seed)[offset + i]``
  (``jdm_fast.ops.philox``), identical on the CPU and CUDA; ``x_t`` uses the returned noise, so
  it equals ``q_sample(x0, t, ..., noise)``. Differentiable in x0.
- ``q_sample_keyed(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, first_example)
  -> (x_t, noise)``: ``q_sample_philox`` at offset ``first_example * per_example``, where
  ``first_example`` is a one-element int64 tensor on the data's device (the global index of the
  batch's first example). Its value is read by the kernel, never by the host: the training step
  keys its noise by (seed, step, example) with no host-device sync and no recompilation per step.
- ``counter_timesteps(first_example, seed, n, num_timesteps) -> int64 (n,)`` and
  ``counter_uniform(first_example, seed, tag, n, width) -> float32 (n, width)``: the
  counter-based timesteps and uniforms of global examples ``first .. first + n - 1``
  (``jdm_fast.ops.philox``), on first_example's device.
- ``eps_mse(eps_hat, noise) -> float32 scalar``: ``mean((eps_hat - noise)^2)``, deterministic
  (fixed reduction order), differentiable in eps_hat (and noise). ``noise`` has eps_hat's dtype or
  float32 (the AMP case: bf16 prediction, fp32 target).
- ``ancestral_step(x_t, eps_hat, t, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
  posterior_mean_coef1, posterior_mean_coef2, log_variance, clip_denoised, noise, seed, offset)
  -> x_{t-1}``: ``x0 = r[t] x_t - rm[t] eps_hat`` (clamped to [-1, 1] if clip_denoised),
  ``x_{t-1} = c1[t] x0 + c2[t] x_t + 1[t > 0] exp(0.5 log_variance[t]) z``. The variance is the
  table passed: ``posterior_log_variance_clipped`` (fixed-small) or ``fixed_large_log_variance``
  (fixed-large). ``z`` is ``noise`` if given, else the Philox stream of ``seed`` at ``offset`` if
  a seed is given, else 0.
- ``ddim_step(x_t, eps_hat, t, t_prev, alphas_cumprod, eta, clip_denoised, noise, seed, offset)
  -> x_{t_prev}``: DDIM (Song et al. 2021, eq. 12) from index t to t_prev in [-1, t) (-1: the
  final step to abar = 1); with clipping, eps is recomputed from the clamped x0; sigma =
  eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'). Noise as for ancestral_step.

Checks: dtypes float32/float16/bfloat16; tables 1-D float32/float64 of one length T on the data's
device; t int64 of shape (batch,); mismatched shapes, dtypes or devices raise ``ValueError`` /
``TypeError`` naming the argument. t outside [0, T) raises ``ValueError`` on the CPU and fails a
device-side assert on CUDA (like an out-of-range index; no host sync per call). Non-contiguous
inputs are copied; outputs are contiguous. The sampler steps have no autograd.
"""
from __future__ import annotations

import operator
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from jdm_fast.ops.backends import current_backend
from jdm_fast.ops import philox
from jdm_fast.ops.philox import normal_stream

__all__ = [
    "HAS_C",
    "fusable",
    "WITH_CUDA",
    "ancestral_step",
    "counter_timesteps",
    "counter_uniform",
    "ddim_step",
    "eps_mse",
    "q_sample",
    "q_sample_keyed",
    "q_sample_philox",
    "reference",
]

OPS = ("q_sample", "q_sample_philox", "q_sample_keyed", "counter_timesteps", "counter_uniform", "eps_mse",
       "eps_mse_backward", "ancestral_step", "ddim_step")
_MASK64 = (1 << 64) - 1


def _load_extension() -> tuple[bool, bool, str | None]:
    if os.environ.get("JDM_FAST_DISABLE_C") == "1":
        return False, False, "JDM_FAST_DISABLE_C=1"
    try:
        from jdm_fast import _C
    except ImportError as e:  # not built, or built against another torch
        return False, False, f"{type(e).__name__}: {e}"
    return True, bool(_C.WITH_CUDA), None


HAS_C, WITH_CUDA, _WHY_NOT = _load_extension()


# ------------------------------------------------------------------------------ references
# Pure PyTorch, used as fallbacks and by backend("reference"). Arguments are validated by the
# wrappers (or, for the registered fallbacks, by _check_* below) before they run.
def _coef(table: Tensor, t: Tensor) -> Tensor:
    """table[t] in float64, shaped (B,)."""
    return table.to(torch.float64).gather(0, t)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.to(torch.float32).reshape(x.shape[0], *([1] * (x.dim() - 1)))


def _philox_noise(seed: int, offset: int, like: Tensor) -> Tensor:
    z = normal_stream(int(seed) & _MASK64, int(offset), like.numel())
    return torch.from_numpy(z).reshape(like.shape).to(like.device, like.dtype)


class reference:  # noqa: N801 - a namespace of functions
    """The ops in plain PyTorch (same math and dtypes as the kernels)."""

    @staticmethod
    def q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
        a, b = _coef(sqrt_alphas_cumprod, t), _coef(sqrt_one_minus_alphas_cumprod, t)
        return (_bcast(a, x0) * x0.float() + _bcast(b, x0) * noise.float()).to(x0.dtype)

    @staticmethod
    def q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset):
        noise = _philox_noise(seed, offset, x0)
        return reference.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise), noise

    @staticmethod
    def q_sample_keyed(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, first_example):
        offset = int(first_example) * (x0[0].numel() if x0.shape[0] else 0)  # a host read of the index
        return reference.q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset)

    @staticmethod
    def counter_timesteps(first_example, seed, n, num_timesteps):
        t = philox.counter_timesteps(int(seed) & _MASK64, int(first_example), int(n), int(num_timesteps))
        return torch.from_numpy(t).to(first_example.device)

    @staticmethod
    def counter_uniform(first_example, seed, tag, n, width):
        u = philox.counter_uniform(int(seed) & _MASK64, int(tag), int(first_example), int(n), int(width))
        return torch.from_numpy(u).to(first_example.device)

    @staticmethod
    def eps_mse(eps_hat, noise):
        return (eps_hat.double() - noise.double()).square().mean().float()

    @staticmethod
    def eps_mse_backward(grad, eps_hat, noise):
        scale = grad.double() * 2.0 / max(eps_hat.numel(), 1)
        return (scale * (eps_hat.float() - noise.float())).to(eps_hat.dtype)

    @staticmethod
    def ancestral_step(x_t, eps_hat, t, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
                       posterior_mean_coef1, posterior_mean_coef2, log_variance, clip_denoised,
                       noise=None, seed=None, offset=0):
        x, e = x_t.float(), eps_hat.float()
        x0 = _bcast(_coef(sqrt_recip_alphas_cumprod, t), x) * x - _bcast(_coef(sqrt_recipm1_alphas_cumprod, t), x) * e
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        out = _bcast(_coef(posterior_mean_coef1, t), x) * x0 + _bcast(_coef(posterior_mean_coef2, t), x) * x
        z = noise if noise is not None else (_philox_noise(seed, offset, x_t) if seed is not None else None)
        if z is not None:
            sigma = torch.where(t > 0, (0.5 * _coef(log_variance, t)).exp(), torch.zeros((), dtype=torch.float64, device=t.device))
            out = out + _bcast(sigma, x) * z.float()
        return out.to(x_t.dtype)

    @staticmethod
    def ddim_step(x_t, eps_hat, t, t_prev, alphas_cumprod, eta, clip_denoised, noise=None, seed=None, offset=0):
        abar = alphas_cumprod.to(torch.float64)
        a = abar.gather(0, t)
        ap = torch.where(t_prev >= 0, abar.gather(0, t_prev.clamp(min=0)), torch.ones_like(a))
        sigma = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).clamp(min=0).sqrt()
        direction = (1 - ap - sigma * sigma).clamp(min=0).sqrt()
        x, e = x_t.float(), eps_hat.float()
        recip, recipm1 = _bcast(a.rsqrt(), x), _bcast((1 / a - 1).sqrt(), x)
        x0 = recip * x - recipm1 * e
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            e = (recip * x - x0) / recipm1
        out = _bcast(ap.sqrt(), x) * x0 + _bcast(direction, x) * e
        z = noise if noise is not None else (_philox_noise(seed, offset, x_t) if seed is not None else None)
        if z is not None:
            out = out + _bcast(sigma, x) * z.float()
        return out.to(x_t.dtype)


# ------------------------------------------------------------------------------ checks
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_x(op: str, name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} must have a batch dimension, got a 0-d tensor")


def _check_like(op: str, name: str, y, xname: str, x: Tensor, same_dtype: bool = True) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(y).__name__}")
    if y.shape != x.shape:
        raise ValueError(f"{op}: {name} must have the shape of {xname} {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{op}: {name} is on {y.device} but {xname} is on {x.device}")
    if same_dtype and y.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {y.dtype} but {xname} has dtype {x.dtype} (they must match)")


def _check_t(op: str, name: str, t, x: Tensor, low: int, T: int | None) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int64:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{op}: {name} must be an int64 tensor of timesteps, got {got}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{op}: {name} must have shape (batch,) = ({x.shape[0]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the data is on {x.device}")
    if T is not None and t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= T:
            raise ValueError(f"{op}: {name} must lie in [{low}, {T}), got values in [{lo}, {hi}]")


def _check_tables(op: str, x: Tensor, **tables: Tensor) -> int:
    T = None
    for name, tab in tables.items():
        if not isinstance(tab, Tensor) or tab.dtype not in (torch.float32, torch.float64):
            got = tab.dtype if isinstance(tab, Tensor) else type(tab).__name__
            raise TypeError(f"{op}: {name} must be a float32 or float64 table, got {got}")
        if tab.dim() != 1 or tab.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty 1-D table of length T, got shape {tuple(tab.shape)}")
        if tab.device != x.device:
            raise ValueError(f"{op}: {name} is on {tab.device} but the data is on {x.device}")
        if T is None:
            T = tab.numel()
        elif tab.numel() != T:
            raise ValueError(f"{op}: {name} has length {tab.numel()} but the other schedule tables have length {T}")
    return T


def _check_step_noise(op: str, noise, seed, offset: int, x_t: Tensor) -> None:
    if offset < 0:
        raise ValueError(f"{op}: offset must be >= 0, got {offset}")
    if noise is not None:
        if seed is not None:
            raise ValueError(f"{op}: pass either noise or seed, not both")
        _check_like(op, "noise", noise, "x_t", x_t)


def _offset(offset) -> int | torch.SymInt:
    """The stream offset as the op's SymInt argument: a symbolic int under torch.compile stays
    symbolic (int() would specialize the graph on it and recompile at every training step, whose
    offset changes every step), anything else becomes a Python int."""
    if isinstance(offset, torch.SymInt) or torch.compiler.is_compiling():
        # while tracing, int() keeps a dynamic int symbolic (operator.index would specialize it)
        return offset if isinstance(offset, torch.SymInt) else int(offset)
    try:
        offset = operator.index(offset)  # ints (NumPy's too); a float is never truncated silently
    except TypeError:
        raise TypeError(f"offset must be an int, got {type(offset).__name__} {offset!r}") from None
    if not 0 <= offset < 2**63:
        raise ValueError(f"offset must lie in [0, 2^63), got {offset}")
    return offset


def _seed64(seed: int) -> int:
    """A Python int seed taken modulo 2^64, as the signed int64 the op schema carries."""
    s = int(seed) & _MASK64
    return s - (1 << 64) if s >= 1 << 63 else s


# ------------------------------------------------------------------------------ fallbacks
def _define_fallbacks() -> None:
    """Register the references under the compiled ops' names (when _C is missing)."""
    from torch.library import custom_op

    @custom_op("jdm_fast::q_sample", mutates_args=())
    def _q_sample(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor,
                  sqrt_one_minus_alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
        return reference.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)

    @custom_op("jdm_fast::q_sample_philox", mutates_args=())
    def _q_sample_philox(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor,
                         sqrt_one_minus_alphas_cumprod: Tensor, seed: int, offset: int) -> tuple[Tensor, Tensor]:
        return reference.q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset)

    @custom_op("jdm_fast::q_sample_keyed", mutates_args=())
    def _q_sample_keyed(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                        seed: int, first_example: Tensor) -> tuple[Tensor, Tensor]:
        return reference.q_sample_keyed(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed,
                                        first_example)

    @custom_op("jdm_fast::counter_timesteps", mutates_args=())
    def _counter_timesteps(first_example: Tensor, seed: int, n: int, num_timesteps: int) -> Tensor:
        return reference.counter_timesteps(first_example, seed, n, num_timesteps)

    @custom_op("jdm_fast::counter_uniform", mutates_args=())
    def _counter_uniform(first_example: Tensor, seed: int, tag: int, n: int, width: int) -> Tensor:
        return reference.counter_uniform(first_example, seed, tag, n, width)

    @custom_op("jdm_fast::eps_mse", mutates_args=())
    def _eps_mse(eps_hat: Tensor, noise: Tensor) -> Tensor:
        return reference.eps_mse(eps_hat, noise)

    @custom_op("jdm_fast::eps_mse_backward", mutates_args=())
    def _eps_mse_backward(grad: Tensor, eps_hat: Tensor, noise: Tensor) -> Tensor:
        return reference.eps_mse_backward(grad, eps_hat, noise)

    @custom_op("jdm_fast::ancestral_step", mutates_args=())
    def _ancestral_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, sqrt_recip_alphas_cumprod: Tensor,
                        sqrt_recipm1_alphas_cumprod: Tensor, posterior_mean_coef1: Tensor,
                        posterior_mean_coef2: Tensor, log_variance: Tensor, clip_denoised: bool,
                        noise: Optional[Tensor], seed: Optional[int], offset: int) -> Tensor:
        return reference.ancestral_step(x_t, eps_hat, t, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
                                        posterior_mean_coef1, posterior_mean_coef2, log_variance,
                                        clip_denoised, noise, seed, offset)

    @custom_op("jdm_fast::ddim_step", mutates_args=())
    def _ddim_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor,
                   eta: float, clip_denoised: bool, noise: Optional[Tensor], seed: Optional[int],
                   offset: int) -> Tensor:
        return reference.ddim_step(x_t, eps_hat, t, t_prev, alphas_cumprod, eta, clip_denoised, noise, seed, offset)


if not HAS_C:
    _define_fallbacks()
    warnings.warn(
        f"jdm_fast._C is not available ({_WHY_NOT}); the noise-schedule ops run their pure-PyTorch "
        "fallbacks (correct, slower). Rebuild with `pip install -e .` (see setup.py) to get the "
        "compiled CPU/CUDA kernels.", RuntimeWarning, stacklevel=2)


# ------------------------------------------------------------------------------ fake + autograd
@torch.library.register_fake("jdm_fast::q_sample")
def _(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


@torch.library.register_fake("jdm_fast::q_sample_philox")
def _(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset):
    return (torch.empty_like(x0, memory_format=torch.contiguous_format),
            torch.empty_like(x0, memory_format=torch.contiguous_format))


@torch.library.register_fake("jdm_fast::q_sample_keyed")
def _(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, first_example):
    return (torch.empty_like(x0, memory_format=torch.contiguous_format),
            torch.empty_like(x0, memory_format=torch.contiguous_format))


@torch.library.register_fake("jdm_fast::counter_timesteps")
def _(first_example, seed, n, num_timesteps):
    return first_example.new_empty((n,), dtype=torch.int64)


@torch.library.register_fake("jdm_fast::counter_uniform")
def _(first_example, seed, tag, n, width):
    return first_example.new_empty((n, width), dtype=torch.float32)


@torch.library.register_fake("jdm_fast::eps_mse")
def _(eps_hat, noise):
    return eps_hat.new_empty((), dtype=torch.float32)


@torch.library.register_fake("jdm_fast::eps_mse_backward")
def _(grad, eps_hat, noise):
    return torch.empty_like(eps_hat, memory_format=torch.contiguous_format)


@torch.library.register_fake("jdm_fast::ancestral_step")
def _(x_t, eps_hat, t, r, rm, c1, c2, log_variance, clip_denoised, noise, seed, offset):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


@torch.library.register_fake("jdm_fast::ddim_step")
def _(x_t, eps_hat, t, t_prev, alphas_cumprod, eta, clip_denoised, noise, seed, offset):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def _q_sample_setup(ctx, inputs, output):
    x0, t, a, b = inputs[:4]
    ctx.save_for_backward(t, a, b)


def _scaled(grad: Tensor, table: Tensor, t: Tensor) -> Tensor:
    return (_bcast(_coef(table, t), grad) * grad.float()).to(grad.dtype)


def _q_sample_backward(ctx, grad):
    t, a, b = ctx.saved_tensors
    gx = _scaled(grad, a, t) if ctx.needs_input_grad[0] else None
    gn = _scaled(grad, b, t) if ctx.needs_input_grad[4] else None
    return gx, None, None, None, gn


torch.library.register_autograd("jdm_fast::q_sample", _q_sample_backward, setup_context=_q_sample_setup)


def _q_sample_philox_backward(ctx, grad_xt, grad_noise):
    t, a, _ = ctx.saved_tensors
    gx = _scaled(grad_xt, a, t) if ctx.needs_input_grad[0] else None
    return gx, None, None, None, None, None


torch.library.register_autograd("jdm_fast::q_sample_philox", _q_sample_philox_backward,
                                setup_context=_q_sample_setup)
torch.library.register_autograd("jdm_fast::q_sample_keyed", _q_sample_philox_backward,
                                setup_context=_q_sample_setup)


def _eps_mse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _eps_mse_backward(ctx, grad):
    eps_hat, noise = ctx.saved_tensors
    g = torch.ops.jdm_fast.eps_mse_backward(grad, eps_hat, noise)
    gn = (-g).to(noise.dtype) if ctx.needs_input_grad[1] else None
    return g if ctx.needs_input_grad[0] else None, gn


torch.library.register_autograd("jdm_fast::eps_mse", _eps_mse_backward, setup_context=_eps_mse_setup)


# ------------------------------------------------------------------------------ wrappers
def fusable(*tensors: Tensor | None) -> bool:
    """Whether the fused ops take these tensors' dtypes (float32/float16/bfloat16; None is
    ignored). Callers (jdm_fast.diffusion, the joint loss) keep plain PyTorch otherwise, e.g. for
    float64 closed-form checks; the samplers also keep it where a gradient must flow through a step."""
    return all(x is None or x.dtype in _FLOATS for x in tensors)


def _use_reference() -> bool:
    return current_backend() == "reference"


def _compiled() -> bool:
    """The compiled op runs and validates its arguments itself (same checks and messages as
    the _check_* functions here), so the wrapper skips its own Python checks: they cost more
    than the op on small tensors."""
    return HAS_C and current_backend() != "reference"


def q_sample(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
             noise: Tensor) -> Tensor:
    """``x_t = sqrt_alphas_cumprod[t] * x0 + sqrt_one_minus_alphas_cumprod[t] * noise``."""
    if _compiled():
        return torch.ops.jdm_fast.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)
    op = "q_sample"
    _check_x(op, "x0", x0)
    _check_like(op, "noise", noise, "x0", x0)
    T = _check_tables(op, x0, sqrt_alphas_cumprod=sqrt_alphas_cumprod,
                      sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod)
    _check_t(op, "t", t, x0, 0, T)
    f = reference.q_sample if _use_reference() else torch.ops.jdm_fast.q_sample
    return f(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)


def q_sample_philox(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                    seed: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """``(x_t, noise)`` with ``noise.flatten()[i] = stream(seed)[offset + i]`` (jdm_fast.ops.philox)."""
    if _compiled():
        return torch.ops.jdm_fast.q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                                  _seed64(seed), _offset(offset))
    op = "q_sample_philox"
    _check_x(op, "x0", x0)
    T = _check_tables(op, x0, sqrt_alphas_cumprod=sqrt_alphas_cumprod,
                      sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod)
    _check_t(op, "t", t, x0, 0, T)
    offset = _offset(offset)
    f = reference.q_sample_philox if _use_reference() else torch.ops.jdm_fast.q_sample_philox
    return f(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, _seed64(seed), offset)


def _check_first_example(op: str, first_example, device: torch.device) -> None:
    if not isinstance(first_example, Tensor) or first_example.dtype != torch.int64:
        got = first_example.dtype if isinstance(first_example, Tensor) else type(first_example).__name__
        raise TypeError(f"{op}: first_example must be an int64 tensor, got {got}")
    if first_example.numel() != 1:
        raise ValueError(f"{op}: first_example must hold one value, got shape {tuple(first_example.shape)}")
    if first_example.device != device:
        raise ValueError(f"{op}: first_example is on {first_example.device} but the data is on {device}")
    if first_example.device.type == "cpu" and not torch.compiler.is_compiling() and int(first_example) < 0:
        raise ValueError(f"{op}: first_example must be >= 0, got {int(first_example)}")


def q_sample_keyed(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                   seed: int, first_example: Tensor) -> tuple[Tensor, Tensor]:
    """``q_sample_philox(..., seed, offset=first_example * per_example)`` with the offset read on the device."""
    if _compiled():
        return torch.ops.jdm_fast.q_sample_keyed(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                                 _seed64(seed), first_example)
    op = "q_sample_keyed"
    _check_x(op, "x0", x0)
    T = _check_tables(op, x0, sqrt_alphas_cumprod=sqrt_alphas_cumprod,
                      sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod)
    _check_t(op, "t", t, x0, 0, T)
    _check_first_example(op, first_example, x0.device)
    f = reference.q_sample_keyed if _use_reference() else torch.ops.jdm_fast.q_sample_keyed
    return f(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, _seed64(seed), first_example)


def _check_counter(op: str, first_example, n: int, size: int, size_name: str) -> None:
    _check_first_example(op, first_example, first_example.device if isinstance(first_example, Tensor) else None)
    if int(n) < 0:
        raise ValueError(f"{op}: n must be >= 0, got {n}")
    if int(size) < 1:
        raise ValueError(f"{op}: {size_name} must be >= 1, got {size}")


def counter_timesteps(first_example: Tensor, seed: int, n: int, num_timesteps: int) -> Tensor:
    """Counter-based timesteps (int64, uniform in ``[0, num_timesteps)``) of global examples
    ``first_example .. first_example + n - 1``, on first_example's device (``jdm_fast.ops.philox``)."""
    if _compiled():
        return torch.ops.jdm_fast.counter_timesteps(first_example, _seed64(seed), n, int(num_timesteps))
    _check_counter("counter_timesteps", first_example, n, num_timesteps, "num_timesteps")
    f = reference.counter_timesteps if _use_reference() else torch.ops.jdm_fast.counter_timesteps
    return f(first_example, _seed64(seed), int(n), int(num_timesteps))


def counter_uniform(first_example: Tensor, seed: int, tag: int, n: int, width: int) -> Tensor:
    """Counter-based float32 uniforms in [0, 1), shape (n, width): row i belongs to global example
    ``first_example + i``; ``tag`` (in [0, 2^32)) names the stream (``jdm_fast.ops.philox``)."""
    if _compiled():
        return torch.ops.jdm_fast.counter_uniform(first_example, _seed64(seed), int(tag), n, width)
    op = "counter_uniform"
    _check_counter(op, first_example, n, width, "width")
    if not 0 <= int(tag) < 2**32:
        raise ValueError(f"{op}: tag must be in [0, 2^32), got {tag}")
    f = reference.counter_uniform if _use_reference() else torch.ops.jdm_fast.counter_uniform
    return f(first_example, _seed64(seed), int(tag), int(n), int(width))


def eps_mse(eps_hat: Tensor, noise: Tensor) -> Tensor:
    """``mean((eps_hat - noise)^2)`` as a float32 scalar; noise in eps_hat's dtype or float32."""
    if isinstance(eps_hat, Tensor) and eps_hat.numel() == 0:
        raise ValueError("eps_mse: eps_hat is empty (the mean of no elements is undefined)")
    if _compiled():
        return torch.ops.jdm_fast.eps_mse(eps_hat, noise)
    op = "eps_mse"
    _check_x(op, "eps_hat", eps_hat)
    _check_like(op, "noise", noise, "eps_hat", eps_hat, same_dtype=False)
    if noise.dtype not in (eps_hat.dtype, torch.float32):
        raise TypeError(f"{op}: noise must have eps_hat's dtype ({eps_hat.dtype}) or float32, got {noise.dtype}")
    if _use_reference():
        return torch.nn.functional.mse_loss(eps_hat.float(), noise.float())
    return torch.ops.jdm_fast.eps_mse(eps_hat, noise)


def _no_grad_inputs(op: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in tensors):
        raise RuntimeError(f"{op} has no autograd (sampling runs under torch.no_grad()); for gradients "
                           "use jdm_fast.ops.noise.reference or the GaussianDiffusion methods")


def ancestral_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, sqrt_recip_alphas_cumprod: Tensor,
                   sqrt_recipm1_alphas_cumprod: Tensor, posterior_mean_coef1: Tensor,
                   posterior_mean_coef2: Tensor, log_variance: Tensor, clip_denoised: bool = True,
                   noise: Tensor | None = None, seed: int | None = None, offset: int = 0) -> Tensor:
    """One fused DDPM ancestral step (see the module docstring)."""
    op = "ancestral_step"
    _no_grad_inputs(op, x_t, eps_hat, noise)
    seed = None if seed is None else _seed64(seed)
    if _compiled():
        return torch.ops.jdm_fast.ancestral_step(
            x_t, eps_hat, t, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
            posterior_mean_coef2, log_variance, bool(clip_denoised), noise, seed, _offset(offset))
    _check_x(op, "x_t", x_t)
    _check_like(op, "eps_hat", eps_hat, "x_t", x_t)
    T = _check_tables(op, x_t, sqrt_recip_alphas_cumprod=sqrt_recip_alphas_cumprod,
                      sqrt_recipm1_alphas_cumprod=sqrt_recipm1_alphas_cumprod,
                      posterior_mean_coef1=posterior_mean_coef1, posterior_mean_coef2=posterior_mean_coef2,
                      log_variance=log_variance)
    _check_t(op, "t", t, x_t, 0, T)
    offset = _offset(offset)
    _check_step_noise(op, noise, seed, offset, x_t)
    f = reference.ancestral_step if _use_reference() else torch.ops.jdm_fast.ancestral_step
    return f(x_t, eps_hat, t, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
             posterior_mean_coef2, log_variance, bool(clip_denoised), noise, seed, offset)


def ddim_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor,
              eta: float = 0.0, clip_denoised: bool = True, noise: Tensor | None = None,
              seed: int | None = None, offset: int = 0) -> Tensor:
    """One fused DDIM step from index t to t_prev in [-1, t) (see the module docstring)."""
    op = "ddim_step"
    _no_grad_inputs(op, x_t, eps_hat, noise)
    seed = None if seed is None else _seed64(seed)
    if _compiled():
        return torch.ops.jdm_fast.ddim_step(x_t, eps_hat, t, t_prev, alphas_cumprod, float(eta), bool(clip_denoised),
                                            noise, seed, _offset(offset))
    _check_x(op, "x_t", x_t)
    _check_like(op, "eps_hat", eps_hat, "x_t", x_t)
    T = _check_tables(op, x_t, alphas_cumprod=alphas_cumprod)
    _check_t(op, "t", t, x_t, 0, T)
    _check_t(op, "t_prev", t_prev, x_t, -1, T)
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"{op}: eta must lie in [0, 1], got {eta}")
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and bool((t_prev >= t).any()):
        raise ValueError(f"{op}: t_prev must be smaller than t for every example")
    offset = _offset(offset)
    _check_step_noise(op, noise, seed, offset, x_t)
    f = reference.ddim_step if _use_reference() else torch.ops.jdm_fast.ddim_step
    return f(x_t, eps_hat, t, t_prev, alphas_cumprod, float(eta), bool(clip_denoised), noise, seed, offset)
