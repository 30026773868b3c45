"""The noise-schedule ops in plain PyTorch: the same math and dtypes as the kernels of csrc/.

These functions are the ops' oracle in the tests, the pure-PyTorch fallbacks registered under the
ops' names when ``jdm_fast._C`` is missing, and what ``jdm_fast.ops.backend("reference")`` runs
(``jdm_fast.ops.noise`` documents the ops). They do not validate their arguments: the public ops
do that before calling them. Autograd is PyTorch's own, so gradients flow through every one.

Element math runs in float32; per-example coefficients ``table[t]`` are gathered in float64
(the schedule tables are float32 or float64); outputs have the input dtype, except ``eps_mse``
(a float32 scalar) and the counter draws (int64 timesteps, float32 uniforms).
"""
from __future__ import annotations

import torch
from torch import Tensor

from jdm_fast.ops import philox

__all__ = [
    "ancestral_step",
    "coefficient",
    "counter_timesteps",
    "counter_uniform",
    "ddim_step",
    "eps_mse",
    "eps_mse_backward",
    "per_example",
    "philox_noise",
    "q_sample",
    "q_sample_keyed",
    "q_sample_philox",
    "scale_per_example",
]

_MASK64 = (1 << 64) - 1


def coefficient(table: Tensor, t: Tensor) -> Tensor:
    """``table[t]`` in float64, shaped (B,)."""
    return table.to(torch.float64).gather(0, t)


def per_example(v: Tensor, x: Tensor) -> Tensor:
    """(B,) coefficients as float32 shaped (B, 1, ..., 1), to broadcast against x."""
    return v.to(torch.float32).reshape(x.shape[0], *([1] * (x.dim() - 1)))


def scale_per_example(grad: Tensor, table: Tensor, t: Tensor) -> Tensor:
    """``table[t] * grad`` per example, in grad's dtype: q_sample's gradient in x0 (table a) or in
    the noise (table b)."""
    return (per_example(coefficient(table, t), grad) * grad.float()).to(grad.dtype)


def philox_noise(seed: int, offset: int, like: Tensor) -> Tensor:
    """``stream(seed)[offset : offset + like.numel()]`` (jdm_fast.ops.philox) shaped as ``like``."""
    z = philox.normal_stream(int(seed) & _MASK64, int(offset), like.numel())
    return torch.from_numpy(z).reshape(like.shape).to(like.device, like.dtype)


def q_sample(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
             noise: Tensor) -> Tensor:
    a, b = coefficient(sqrt_alphas_cumprod, t), coefficient(sqrt_one_minus_alphas_cumprod, t)
    return (per_example(a, x0) * x0.float() + per_example(b, x0) * noise.float()).to(x0.dtype)


def q_sample_philox(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                    seed: int, offset: int) -> tuple[Tensor, Tensor]:
    noise = philox_noise(seed, offset, x0)
    return q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise), noise


def q_sample_keyed(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                   seed: int, first_example: Tensor) -> tuple[Tensor, Tensor]:
    per_ex = x0[0].numel() if x0.shape[0] else 0
    offset = int(first_example) * per_ex  # a host read of the index (the kernels read it on the device)
    return q_sample_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset)


def counter_timesteps(first_example: Tensor, seed: int, n: int, num_timesteps: int) -> Tensor:
    t = philox.counter_timesteps(int(seed) & _MASK64, int(first_example), int(n), int(num_timesteps))
    return torch.from_numpy(t).to(first_example.device)


def counter_uniform(first_example: Tensor, seed: int, tag: int, n: int, width: int) -> Tensor:
    u = philox.counter_uniform(int(seed) & _MASK64, int(tag), int(first_example), int(n), int(width))
    return torch.from_numpy(u).contiguous().to(first_example.device)  # u is a column slice of wider rows


def eps_mse(eps_hat: Tensor, noise: Tensor) -> Tensor:
    return (eps_hat.double() - noise.double()).square().mean().float()


def eps_mse_backward(grad: Tensor, eps_hat: Tensor, noise: Tensor) -> Tensor:
    scale = grad.double() * 2.0 / max(eps_hat.numel(), 1)
    return (scale * (eps_hat.float() - noise.float())).to(eps_hat.dtype)


def _step_noise(noise: Tensor | None, seed: int | None, offset: int, x_t: Tensor) -> Tensor | None:
    """A sampler step's z: the tensor if given, else the Philox stream of seed if given, else none."""
    if noise is not None:
        return noise
    return philox_noise(seed, offset, x_t) if seed is not None else None


def ancestral_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, sqrt_recip_alphas_cumprod: Tensor,
                   sqrt_recipm1_alphas_cumprod: Tensor, posterior_mean_coef1: Tensor,
                   posterior_mean_coef2: Tensor, log_variance: Tensor, *, clip_denoised: bool,
                   noise: Tensor | None = None, seed: int | None = None, offset: int = 0) -> Tensor:
    x, e = x_t.float(), eps_hat.float()
    x0 = (per_example(coefficient(sqrt_recip_alphas_cumprod, t), x) * x
          - per_example(coefficient(sqrt_recipm1_alphas_cumprod, t), x) * e)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    out = (per_example(coefficient(posterior_mean_coef1, t), x) * x0
           + per_example(coefficient(posterior_mean_coef2, t), x) * x)
    z = _step_noise(noise, seed, offset, x_t)
    if z is not None:
        zero = torch.zeros((), dtype=torch.float64, device=t.device)
        sigma = torch.where(t > 0, (0.5 * coefficient(log_variance, t)).exp(), zero)
        out = out + per_example(sigma, x) * z.float()
    return out.to(x_t.dtype)


def ddim_step(x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor, *,
              eta: float, clip_denoised: bool, noise: Tensor | None = None, seed: int | None = None,
              offset: int = 0) -> Tensor:
    abar = alphas_cumprod.to(torch.float64)
    a = abar.gather(0, t)
    ap = torch.where(t_prev >= 0, abar.gather(0, t_prev.clamp(min=0)), torch.ones_like(a))
    sigma = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).clamp(min=0).sqrt()
    direction = (1 - ap - sigma * sigma).clamp(min=0).sqrt()
    x, e = x_t.float(), eps_hat.float()
    recip, recipm1 = per_example(a.rsqrt(), x), per_example((1 / a - 1).sqrt(), x)
    x0 = recip * x - recipm1 * e
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        e = (recip * x - x0) / recipm1
    out = per_example(ap.sqrt(), x) * x0 + per_example(direction, x) * e
    z = _step_noise(noise, seed, offset, x_t)
    if z is not None:
        out = out + per_example(sigma, x) * z.float()
    return out.to(x_t.dtype)
