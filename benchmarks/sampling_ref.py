"""Eager reference sampler loops: the DDIM (eta = 0) and respaced ancestral updates written as
plain tensor math with per-step Python-float coefficients, what a user writes without our fused
step ops. Same timesteps, noise order and clamping as ``jdm_fast.diffusion.samplers``
(tests/test_baseline.py checks they agree), so benchmarks/test_sampling.py times like for like.
"""
from __future__ import annotations

import torch


def _spaced(num_timesteps: int, steps: int) -> list[int]:
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


@torch.no_grad()
def ddim(model_fn, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, steps: int = 50) -> torch.Tensor:
    abar = alphas_cumprod.double().cpu().tolist()
    seq = _spaced(len(abar), steps)
    x = x_T.clone()
    for k in reversed(range(len(seq))):
        a, a_prev = abar[seq[k]], (abar[seq[k - 1]] if k > 0 else 1.0)
        t = torch.full((x.shape[0],), seq[k], dtype=torch.long, device=x.device)
        eps = model_fn(x, t).to(x.dtype)
        recip, recipm1 = a ** -0.5, (1.0 / a - 1.0) ** 0.5
        x0 = (recip * x - recipm1 * eps).clamp(-1.0, 1.0)
        eps = (recip * x - x0) / recipm1
        x = a_prev ** 0.5 * x0 + max(1.0 - a_prev, 0.0) ** 0.5 * eps
    return x


@torch.no_grad()
def ancestral(model_fn, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, steps: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling on ``steps`` respaced timesteps, posterior variance (fixed_small)."""
    full = alphas_cumprod.double().cpu()
    use = _spaced(full.numel(), steps)
    abar = full[use]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1.0 - abar / abar_prev
    var = beta * (1.0 - abar_prev) / (1.0 - abar)
    logvar = torch.log(torch.cat([var[1:2] if len(use) > 1 else beta[:1], var[1:]]))
    c1 = (beta * abar_prev.sqrt() / (1.0 - abar)).tolist()
    c2 = ((1.0 - abar_prev) * (1.0 - beta).sqrt() / (1.0 - abar)).tolist()
    sigma = (0.5 * logvar).exp().tolist()
    recip, recipm1 = abar.rsqrt().tolist(), (1.0 / abar - 1.0).sqrt().tolist()
    x = x_T.clone()
    for i in reversed(range(len(use))):
        t = torch.full((x.shape[0],), use[i], dtype=torch.long, device=x.device)
        eps = model_fn(x, t).to(x.dtype)
        x0 = (recip[i] * x - recipm1[i] * eps).clamp(-1.0, 1.0)
        mean = c1[i] * x0 + c2[i] * x
        if i > 0:
            x = mean + sigma[i] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            x = mean
    return x
