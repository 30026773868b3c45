"""GroupNorm -> optional FiLM scale-shift -> optional SiLU.

``y = act(((x - mean_g) * rstd_g * weight_c + bias_c) * (1 + scale_nc) + shift_nc)``

Reference path in PyTorch (statistics in fp32 whatever the input dtype); the fused Triton kernel
of issue 3 replaces it behind this function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = ("silu", None)


def _check_film(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is None:
        return
    n, c = x.shape[:2]
    if t.shape not in ((n, c), (n, c) + (1,) * (x.dim() - 2)):
        raise ValueError(
            f"group_norm_silu: {name} must have shape ({n}, {c}) (or with trailing 1s), "
            f"got {tuple(t.shape)}"
        )


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """GroupNorm over (C/G, *spatial) per group, then ``* (1 + scale) + shift``, then SiLU.

    x: (N, C, *spatial) float tensor; weight/bias: (C,) or None; scale/shift: (N, C) or None.
    Returns a tensor of x's dtype and shape.
    """
    if not x.is_floating_point():
        raise TypeError(f"group_norm_silu: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(
            f"group_norm_silu: num_channels={c} must be divisible by num_groups={num_groups}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"group_norm_silu: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    _check_film("scale", scale, x)
    _check_film("shift", shift, x)
    # fp32 statistics: F.group_norm under autocast already runs in fp32; make it explicit.
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    extra = (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.float().reshape(scale.shape[0], c, *extra))
    if shift is not None:
        y = y + shift.float().reshape(shift.shape[0], c, *extra)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
