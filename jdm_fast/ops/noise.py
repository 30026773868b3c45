"""Noise-schedule ops: forward noising, the eps loss, and fused sampler steps.

The ops are ``torch.ops.jdm_fast.<name>``, implemented in C++ (CPU) and CUDA by the extension
``jdm_fast._C`` (``csrc/``, loaded by ``jdm_fast.ops._extension``). This module registers their
fake implementations and autograd (so ``torch.compile(fullgraph=True)`` traces them) and exposes
typed wrappers, the public ops. Where ``jdm_fast._C`` is missing, the same op names are defined
here as ``torch.library.custom_op``s that check their arguments as the C++ ops do
(``jdm_fast.ops._noise_checks``) and run the pure-PyTorch references
(``jdm_fast.ops.noise_reference``); ``jdm_fast.ops.backend("reference")`` routes the wrappers to
these Python ops too.

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

Checks, made once by the op that runs (C++, or the Python mirror in ``_noise_checks``): dtypes
float32/float16/bfloat16; tables 1-D float32/float64 of one length T on the data's device; t int64
of shape (batch,); mismatched shapes, dtypes or devices raise ``ValueError`` / ``TypeError`` naming
the argument. t outside [0, T) raises ``ValueError`` on the CPU and fails a
device-side assert on CUDA (like an out-of-range index; no host sync per call). Non-contiguous
inputs are copied; outputs are contiguous. The sampler steps have no autograd.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from jdm_fast.ops import _noise_checks as checks
from jdm_fast.ops import noise_reference as ref
from jdm_fast.ops._extension import HAS_C, WITH_CUDA
from jdm_fast.ops.backends import current_backend

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
]

_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------ argument conversion
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
    """A seed that fits 64 bits (signed or unsigned: [-2^63, 2^64)) as the signed int64 the op schema
    carries; a negative seed is its two's complement (-1 is 2^64 - 1). Anything wider is an error:
    taken modulo 2^64, 2^64 would silently be seed 0's stream."""
    try:
        seed = operator.index(seed)  # ints (NumPy's too); a float is never truncated silently
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}") from None
    if not -(1 << 63) <= seed < 1 << 64:
        raise ValueError(f"seed must lie in [-2^63, 2^64) (64 bits), got {seed}")
    s = seed & _MASK64
    return s - (1 << 64) if s >= 1 << 63 else s


# ------------------------------------------------------------------------------ the Python ops
# The ops in Python: the checks of csrc/noise_common.h (mirrored in _noise_checks), then the
# reference. They run where the compiled ops do not: registered under the ops' names when _C is
# missing, and called by the wrappers under backend("reference"). Their positional signatures are
# the op schemas (custom_op infers the fallbacks' schemas from them), so they stay positional.
def _python_q_sample(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                     noise: Tensor) -> Tensor:
    checks.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)
    return ref.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)


def _python_q_sample_philox(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor,
                            sqrt_one_minus_alphas_cumprod: Tensor, seed: int, offset: int) -> tuple[Tensor, Tensor]:
    checks.q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset)
    return ref.q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset)


def _python_q_sample_keyed(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                           seed: int, first_example: Tensor) -> tuple[Tensor, Tensor]:
    checks.q_sample_keyed(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, first_example)
    return ref.q_sample_keyed(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, first_example)


def _python_counter_timesteps(first_example: Tensor, seed: int, n: int, num_timesteps: int) -> Tensor:
    checks.counter_timesteps(first_example, seed, n, num_timesteps)
    return ref.counter_timesteps(first_example, seed, n, num_timesteps)


def _python_counter_uniform(first_example: Tensor, seed: int, tag: int, n: int, width: int) -> Tensor:
    checks.counter_uniform(first_example, seed, tag, n, width)
    return ref.counter_uniform(first_example, seed, tag, n, width)


def _python_eps_mse(eps_hat: Tensor, noise: Tensor) -> Tensor:
    checks.eps_mse(eps_hat, noise)
    return ref.eps_mse(eps_hat, noise)


def _python_eps_mse_backward(grad: Tensor, eps_hat: Tensor, noise: Tensor) -> Tensor:
    checks.eps_mse_backward(grad, eps_hat, noise)
    return ref.eps_mse_backward(grad, eps_hat, noise)


def _python_ancestral_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, sqrt_recip_alphas_cumprod: Tensor,
                           sqrt_recipm1_alphas_cumprod: Tensor, posterior_mean_coef1: Tensor,
                           posterior_mean_coef2: Tensor, log_variance: Tensor, clip_denoised: bool,
                           noise: Optional[Tensor], seed: Optional[int], offset: int) -> Tensor:
    tables = (sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2,
              log_variance)
    checks.ancestral_step(x_t, eps_hat, t, *tables, noise=noise, seed=seed, offset=offset)
    return ref.ancestral_step(x_t, eps_hat, t, *tables, clip_denoised=clip_denoised, noise=noise, seed=seed,
                              offset=offset)


def _python_ddim_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor,
                      eta: float, clip_denoised: bool, noise: Optional[Tensor], seed: Optional[int],
                      offset: int) -> Tensor:
    checks.ddim_step(x_t, eps_hat, t, t_prev, alphas_cumprod, eta=eta, noise=noise, seed=seed, offset=offset)
    return ref.ddim_step(x_t, eps_hat, t, t_prev, alphas_cumprod, eta=eta, clip_denoised=clip_denoised,
                         noise=noise, seed=seed, offset=offset)


_PYTHON_OPS = {
    "q_sample": _python_q_sample,
    "q_sample_philox": _python_q_sample_philox,
    "q_sample_keyed": _python_q_sample_keyed,
    "counter_timesteps": _python_counter_timesteps,
    "counter_uniform": _python_counter_uniform,
    "eps_mse": _python_eps_mse,
    "eps_mse_backward": _python_eps_mse_backward,
    "ancestral_step": _python_ancestral_step,
    "ddim_step": _python_ddim_step,
}
OPS = tuple(_PYTHON_OPS)  # the op names of the extension's schema

if not HAS_C:  # the same op names, run in Python (_extension has said so once)
    for _name, _fn in _PYTHON_OPS.items():
        torch.library.custom_op(f"jdm_fast::{_name}", _fn, mutates_args=())


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


def _q_sample_backward(ctx, grad):
    t, a, b = ctx.saved_tensors
    gx = ref.scale_per_example(grad, a, t) if ctx.needs_input_grad[0] else None
    gn = ref.scale_per_example(grad, b, t) if ctx.needs_input_grad[4] else None
    return gx, None, None, None, gn


torch.library.register_autograd("jdm_fast::q_sample", _q_sample_backward, setup_context=_q_sample_setup)


def _q_sample_philox_backward(ctx, grad_xt, grad_noise):
    t, a, _ = ctx.saved_tensors
    gx = ref.scale_per_example(grad_xt, a, t) if ctx.needs_input_grad[0] else None
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
# The public ops. Arguments are checked once, by the op that runs (C++, or the Python op above);
# the wrappers only convert seeds and offsets to the schema's int64 / SymInt.
def fusable(*tensors: Tensor | None) -> bool:
    """Whether the fused ops take these tensors' dtypes (float32/float16/bfloat16; None is
    ignored). Callers (jdm_fast.diffusion, the joint loss) keep plain PyTorch otherwise, e.g. for
    float64 closed-form checks; the samplers also keep it where a gradient must flow through a step."""
    return all(x is None or x.dtype in checks.FLOATS for x in tensors)


def _use_reference() -> bool:
    return current_backend() == "reference"


def q_sample(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
             noise: Tensor) -> Tensor:
    """``x_t = sqrt_alphas_cumprod[t] * x0 + sqrt_one_minus_alphas_cumprod[t] * noise``."""
    f = _python_q_sample if _use_reference() else torch.ops.jdm_fast.q_sample
    return f(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)


def q_sample_philox(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                    seed: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """``(x_t, noise)`` with ``noise.flatten()[i] = stream(seed)[offset + i]`` (jdm_fast.ops.philox)."""
    f = _python_q_sample_philox if _use_reference() else torch.ops.jdm_fast.q_sample_philox
    return f(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, _seed64(seed), _offset(offset))


def q_sample_keyed(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                   seed: int, first_example: Tensor) -> tuple[Tensor, Tensor]:
    """``q_sample_philox(..., seed, offset=first_example * per_example)`` with the offset read on the device."""
    f = _python_q_sample_keyed if _use_reference() else torch.ops.jdm_fast.q_sample_keyed
    return f(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, _seed64(seed), first_example)


def counter_timesteps(first_example: Tensor, seed: int, n: int, num_timesteps: int) -> Tensor:
    """Counter-based timesteps (int64, uniform in ``[0, num_timesteps)``) of global examples
    ``first_example .. first_example + n - 1``, on first_example's device (``jdm_fast.ops.philox``)."""
    f = _python_counter_timesteps if _use_reference() else torch.ops.jdm_fast.counter_timesteps
    return f(first_example, _seed64(seed), n, int(num_timesteps))


def counter_uniform(first_example: Tensor, seed: int, tag: int, n: int, width: int) -> Tensor:
    """Counter-based float32 uniforms in [0, 1), shape (n, width): row i belongs to global example
    ``first_example + i``; ``tag`` (in [0, 2^32)) names the stream (``jdm_fast.ops.philox``)."""
    f = _python_counter_uniform if _use_reference() else torch.ops.jdm_fast.counter_uniform
    return f(first_example, _seed64(seed), int(tag), n, width)


def eps_mse(eps_hat: Tensor, noise: Tensor) -> Tensor:
    """``mean((eps_hat - noise)^2)`` as a float32 scalar; noise in eps_hat's dtype or float32."""
    # The op returns NaN for empty inputs (as mse_loss); the public function refuses them.
    if isinstance(eps_hat, Tensor) and eps_hat.numel() == 0:
        raise ValueError("eps_mse: eps_hat is empty (the mean of no elements is undefined)")
    f = _python_eps_mse if _use_reference() else torch.ops.jdm_fast.eps_mse
    return f(eps_hat, noise)


def _no_grad_inputs(op: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in tensors):
        raise RuntimeError(f"{op} has no autograd (sampling runs under torch.no_grad()); for gradients "
                           "use jdm_fast.ops.noise_reference or the GaussianDiffusion methods")


def ancestral_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, sqrt_recip_alphas_cumprod: Tensor,
                   sqrt_recipm1_alphas_cumprod: Tensor, posterior_mean_coef1: Tensor,
                   posterior_mean_coef2: Tensor, log_variance: Tensor, clip_denoised: bool = True,
                   noise: Tensor | None = None, *, seed: int | None = None, offset: int = 0) -> Tensor:
    """One fused DDPM ancestral step (see the module docstring). The op's arguments in its order;
    the Philox ``seed`` and ``offset`` by keyword."""
    _no_grad_inputs("ancestral_step", x_t, eps_hat, noise)
    f = _python_ancestral_step if _use_reference() else torch.ops.jdm_fast.ancestral_step
    return f(x_t, eps_hat, t, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
             posterior_mean_coef2, log_variance, bool(clip_denoised), noise,
             None if seed is None else _seed64(seed), _offset(offset))


def ddim_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor,
              eta: float = 0.0, clip_denoised: bool = True, noise: Tensor | None = None, *,
              seed: int | None = None, offset: int = 0) -> Tensor:
    """One fused DDIM step from index t to t_prev in [-1, t) (see the module docstring). The op's
    arguments in its order; the Philox ``seed`` and ``offset`` by keyword."""
    _no_grad_inputs("ddim_step", x_t, eps_hat, noise)
    f = _python_ddim_step if _use_reference() else torch.ops.jdm_fast.ddim_step
    return f(x_t, eps_hat, t, t_prev, alphas_cumprod, float(eta), bool(clip_denoised), noise,
             None if seed is None else _seed64(seed), _offset(offset))
