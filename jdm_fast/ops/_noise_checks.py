"""Argument checks of the noise-schedule ops in Python: a mirror of csrc/noise_common.h.

The compiled ops check their arguments in C++. Where the ops run in Python instead (the fallbacks
registered when ``jdm_fast._C`` is missing, and ``backend("reference")``), these functions make the
same checks with the same kinds of error (``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong shape, device or value), each naming the argument and what it must be.

Timestep values are range-checked on CPU tensors only, and not while torch.compile traces: on an
accelerator the check would be a host-device sync per call (the CUDA kernels assert on the device).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FLOATS",
    "ancestral_step",
    "counter_timesteps",
    "counter_uniform",
    "ddim_step",
    "eps_mse",
    "eps_mse_backward",
    "q_sample",
    "q_sample_keyed",
    "q_sample_philox",
]

FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the data dtypes the ops take


def _values_visible(t: Tensor) -> bool:
    """Whether t's values can be read without a device sync or a graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


# ------------------------------------------------------------------------------ pieces
def _check_x(op: str, name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
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


def _check_t(op: str, name: str, t, x: Tensor, low: int, T: int) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int64:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{op}: {name} must be an int64 tensor of timesteps, got {got}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{op}: {name} must have shape (batch,) = ({x.shape[0]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the data is on {x.device}")
    if t.numel() and _values_visible(t):
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= T:
            raise ValueError(f"{op}: {name} must lie in [{low}, {T}), got values in [{lo}, {hi}]")


def _check_tables(op: str, x: Tensor, **tables: Tensor) -> int:
    """Checks schedule tables (1-D float32/float64 on x's device, one length) and returns T."""
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


def _check_forward_schedule(op: str, x0: Tensor, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod) -> None:
    """The two forward-process tables and the timesteps that index them (the q_sample family)."""
    T = _check_tables(op, x0, sqrt_alphas_cumprod=sqrt_alphas_cumprod,
                      sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod)
    _check_t(op, "t", t, x0, 0, T)


def _check_offset(op: str, offset: int) -> None:
    if offset < 0:
        raise ValueError(f"{op}: offset must be >= 0, got {offset}")


def _check_step_noise(op: str, noise, seed, offset: int, x_t: Tensor) -> None:
    _check_offset(op, offset)
    if noise is not None:
        if seed is not None:
            raise ValueError(f"{op}: pass either noise or seed, not both")
        _check_like(op, "noise", noise, "x_t", x_t)


def _check_first_example(op: str, first_example, device: torch.device | None) -> None:
    if not isinstance(first_example, Tensor) or first_example.dtype != torch.int64:
        got = first_example.dtype if isinstance(first_example, Tensor) else type(first_example).__name__
        raise TypeError(f"{op}: first_example must be an int64 tensor, got {got}")
    if first_example.numel() != 1:
        raise ValueError(f"{op}: first_example must hold one value, got shape {tuple(first_example.shape)}")
    if first_example.device != device:
        raise ValueError(f"{op}: first_example is on {first_example.device} but the data is on {device}")
    if _values_visible(first_example) and int(first_example) < 0:
        raise ValueError(f"{op}: first_example must be >= 0, got {int(first_example)}")


def _check_counter(op: str, first_example, n: int, size: int, size_name: str) -> None:
    _check_first_example(op, first_example, first_example.device if isinstance(first_example, Tensor) else None)
    if int(n) < 0:
        raise ValueError(f"{op}: n must be >= 0, got {n}")
    if int(size) < 1:
        raise ValueError(f"{op}: {size_name} must be >= 1, got {size}")


# ------------------------------------------------------------------------------ one per op
def q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise) -> None:
    op = "q_sample"
    _check_x(op, "x0", x0)
    _check_like(op, "noise", noise, "x0", x0)
    _check_forward_schedule(op, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


def q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset) -> None:
    op = "q_sample_philox"
    _check_x(op, "x0", x0)
    _check_forward_schedule(op, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    _check_offset(op, offset)


def q_sample_keyed(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, first_example) -> None:
    op = "q_sample_keyed"
    _check_x(op, "x0", x0)
    _check_forward_schedule(op, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    _check_first_example(op, first_example, x0.device)


def counter_timesteps(first_example, seed, n, num_timesteps) -> None:
    _check_counter("counter_timesteps", first_example, n, num_timesteps, "num_timesteps")


def counter_uniform(first_example, seed, tag, n, width) -> None:
    op = "counter_uniform"
    _check_counter(op, first_example, n, width, "width")
    if not 0 <= int(tag) < 2**32:
        raise ValueError(f"{op}: tag must be in [0, 2^32), got {tag}")


def eps_mse(eps_hat, noise, op: str = "eps_mse") -> None:
    _check_x(op, "eps_hat", eps_hat)
    _check_like(op, "noise", noise, "eps_hat", eps_hat, same_dtype=False)
    if noise.dtype not in (eps_hat.dtype, torch.float32):
        raise TypeError(f"{op}: noise must have eps_hat's dtype ({eps_hat.dtype}) or float32, got {noise.dtype}")


def eps_mse_backward(grad, eps_hat, noise) -> None:
    op = "eps_mse_backward"
    eps_mse(eps_hat, noise, op)
    if not isinstance(grad, Tensor) or grad.numel() != 1:
        got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(f"{op}: grad must be a scalar, got {got}")


def ancestral_step(x_t, eps_hat, t, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
                   posterior_mean_coef1, posterior_mean_coef2, log_variance, *, noise, seed, offset) -> None:
    op = "ancestral_step"
    _check_x(op, "x_t", x_t)
    _check_like(op, "eps_hat", eps_hat, "x_t", x_t)
    T = _check_tables(op, x_t, sqrt_recip_alphas_cumprod=sqrt_recip_alphas_cumprod,
                      sqrt_recipm1_alphas_cumprod=sqrt_recipm1_alphas_cumprod,
                      posterior_mean_coef1=posterior_mean_coef1, posterior_mean_coef2=posterior_mean_coef2,
                      log_variance=log_variance)
    _check_t(op, "t", t, x_t, 0, T)
    _check_step_noise(op, noise, seed, offset, x_t)


def ddim_step(x_t, eps_hat, t, t_prev, alphas_cumprod, *, eta, noise, seed, offset) -> None:
    op = "ddim_step"
    _check_x(op, "x_t", x_t)
    _check_like(op, "eps_hat", eps_hat, "x_t", x_t)
    T = _check_tables(op, x_t, alphas_cumprod=alphas_cumprod)
    _check_t(op, "t", t, x_t, 0, T)
    _check_t(op, "t_prev", t_prev, x_t, -1, T)
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"{op}: eta must lie in [0, 1], got {eta}")
    if _values_visible(t) and bool((t_prev >= t).any()):
        raise ValueError(f"{op}: t_prev must be smaller than t for every example")
    _check_step_noise(op, noise, seed, offset, x_t)
