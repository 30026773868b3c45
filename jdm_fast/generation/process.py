"""The reverse process with a pluggable eps: the loop shared by every sampler of this package.

``eps_fn(x_t, t, t_value) -> (eps, shift)`` gets the ORIGINAL timestep of the step, as indices (B,)
on the device and as the Python int ``t_value`` they all hold (so steering decisions need no
host-device sync), and returns the (possibly steered) eps prediction and an optional tensor added
to the step's output (classifier guidance's mean shift; None otherwise). Steering needs gradients
through the network, never through the step itself: the step runs under ``torch.no_grad()``, so
``jdm_fast.diffusion``'s step functions dispatch to the fused ops.

Timesteps are any ascending subsequence ``seq`` of [0, T): DDIM steps between consecutive
entries on the original alphas_cumprod; the ancestral sampler runs on the diffusion respaced to
``seq`` (betas ``1 - abar_{seq[i]} / abar_{seq[i-1]}``), which for ``seq = range(T)`` is the
original chain. Starting below T - 1 (counterfactuals) means starting from ``q(x_{seq[-1]} | x_0)``.
"""
from __future__ import annotations

from typing import Callable

import torch

from jdm_fast.diffusion import GaussianDiffusion, ancestral_step, ddim_step, spaced_timesteps

SAMPLERS = ("ddim", "ancestral")
EpsFn = Callable[[torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]


def timestep_sequence(num_timesteps: int, steps: int | None, t_start: float = 1.0) -> list[int]:
    """Ascending original timesteps of a reverse run that starts at fraction ``t_start`` of T.

    ``steps=None`` uses every timestep up to the start (the full chain); otherwise
    ``round(steps * t_start)`` (at least 1) evenly spaced ones, the last being the start index
    ``round(t_start * T) - 1``."""
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must lie in (0, 1] (a fraction of T), got {t_start}")
    top = max(1, round(t_start * num_timesteps))  # timesteps 0 .. top-1
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return spaced_timesteps(top, top if steps is None else max(1, min(top, round(steps * t_start))))


def respaced(diffusion: GaussianDiffusion, seq: list[int]) -> GaussianDiffusion:
    """The diffusion whose step i goes from original timestep ``seq[i]`` to ``seq[i - 1]``, for a
    ``seq`` of :func:`timestep_sequence`: the chain up to the start ``seq[-1]``, respaced
    (:meth:`GaussianDiffusion.respace`) to ``len(seq)`` steps; with every timestep up to the start,
    the original chain itself."""
    top = seq[-1] + 1
    base = diffusion if top == diffusion.num_timesteps else GaussianDiffusion(diffusion.betas[:top])
    chain, timestep_map = base.respace(len(seq))
    if timestep_map.tolist() != list(seq):
        raise ValueError(f"the ancestral sampler runs on evenly spaced timesteps (timestep_sequence), got {seq}")
    return chain


def reverse_process(eps_fn: EpsFn, diffusion: GaussianDiffusion, x: torch.Tensor, seq: list[int], *,
                    sampler: str = "ddim", eta: float = 0.0, generator: torch.Generator | None = None,
                    clip_denoised: bool = True) -> torch.Tensor:
    """Run from ``x`` (a sample at original timestep ``seq[-1]``) down to x_0."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    b, dev = x.shape[0], x.device
    spaced = respaced(diffusion, seq) if sampler == "ancestral" else None
    for k in reversed(range(len(seq))):
        t = torch.full((b,), seq[k], dtype=torch.long, device=dev)
        eps, shift = eps_fn(x, t, seq[k])
        with torch.no_grad():
            eps = eps.detach().to(x.dtype)
            if sampler == "ddim":
                t_prev = torch.full_like(t, seq[k - 1] if k > 0 else -1)
                noise = torch.randn(x.shape, generator=generator, device=dev) if eta > 0 and k > 0 else None
                x = ddim_step(diffusion, eps, x, t, t_prev, eta, noise, clip_denoised)
            else:
                noise = torch.randn(x.shape, generator=generator, device=dev) if k > 0 else None
                x = ancestral_step(spaced, eps, x, torch.full_like(t, k), noise, clip_denoised)
            if shift is not None and k > 0:
                x = x + shift.detach().to(x.dtype)
    return x


