"""Noise schedules: beta_t for t = 0 .. T-1, as float64 tensors.

Index convention (as in DDPM / improved-diffusion / guided-diffusion): index ``t`` in
``[0, T)`` is the paper's step ``t + 1``, so ``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)``
is the signal level after ``t + 1`` noising steps.

Schedules
---------
``"jdm_linear"``  the Joint Diffusion Models authors' schedule: linear in t from
                  ``1e-3 * 1000/T`` to ``0.02 * 1000/T``.
``"linear"``      DDPM's linear schedule with improved-diffusion's scaling: linear from
                  ``1e-4 * 1000/T`` to ``0.02 * 1000/T``.
``"cosine"``      Nichol & Dhariwal (2021): ``abar(u) = f(u) / f(0)`` with
                  ``f(u) = cos^2(((u + s) / (1 + s)) * pi / 2)``, ``s = 0.008``, discretised as
                  ``beta_t = min(1 - f((t + 1)/T) / f(t/T), 0.999)``.

The ``1000/T`` factor keeps the total noise roughly constant when T changes; it also means
the linear schedules need ``T > 1000 * beta_end = 20`` or some beta reaches 1.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "make_betas"]

SCHEDULES: tuple[str, ...] = ("jdm_linear", "linear", "cosine")

# (beta_start, beta_end) at T = 1000; both are scaled by 1000 / T.
_LINEAR_ENDPOINTS: dict[str, tuple[float, float]] = {
    "jdm_linear": (1e-3, 0.02),
    "linear": (1e-4, 0.02),
}

COSINE_S: float = 0.008
COSINE_MAX_BETA: float = 0.999


def _linear_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """``beta_t = start*k + (end - start)*k * t / (T - 1)`` with ``k = 1000 / T``."""
    start, end = _LINEAR_ENDPOINTS[name]
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(start * scale, end * scale, num_timesteps, dtype=torch.float64)
    if bool((betas >= 1.0).any()):
        min_t = math.floor(1000.0 * end) + 1  # smallest T with end * 1000 / T < 1
        raise ValueError(
            f"schedule {name!r}: num_timesteps={num_timesteps} is too small, the largest beta "
            f"{float(betas.max()):.4g} (= {end} * 1000 / T) must be < 1; use num_timesteps >= "
            f"{min_t}"
        )
    return betas


def _cosine_abar(u: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """Unnormalised ``f(u) = cos^2(((u + s) / (1 + s)) * pi / 2)`` for ``u`` in [0, 1]."""
    return torch.cos((u + s) / (1.0 + s) * (math.pi / 2.0)) ** 2


def _cosine_betas(num_timesteps: int) -> torch.Tensor:
    """``beta_t = min(1 - f((t + 1) / T) / f(t / T), 0.999)``."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    ratio = _cosine_abar((t + 1.0) / num_timesteps) / _cosine_abar(t / num_timesteps)
    return (1.0 - ratio).clamp(max=COSINE_MAX_BETA)


def make_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    """Return the betas of a named schedule as a float64 tensor of shape ``(num_timesteps,)``.

    Args:
        schedule: one of :data:`SCHEDULES`.
        num_timesteps: T, the number of diffusion steps (an int >= 1).

    Raises:
        ValueError: unknown schedule name, T < 1, or (linear schedules) T so small that a beta
            reaches 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int):
        raise TypeError(f"num_timesteps must be an int, got {type(num_timesteps).__name__}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "cosine":
        return _cosine_betas(num_timesteps)
    return _linear_betas(schedule, num_timesteps)
