"""GroupNorm (+ FiLM scale-shift) (+ SiLU) as a drop-in subclass of ``nn.GroupNorm``."""
from __future__ import annotations

import torch
from torch import nn

from jdm_fast.ops import group_norm_silu


class GroupNormSiLU(nn.GroupNorm):
    """``nn.GroupNorm`` followed by optional ``* (1 + scale) + shift`` and SiLU, as one op.

    Same constructor arguments (plus ``activation``) and state_dict keys as ``nn.GroupNorm``, so
    checkpoints of models built with ``nn.GroupNorm`` load unchanged.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = "silu", device=None, dtype=None) -> None:
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"GroupNormSiLU: num_channels={num_channels} must be divisible by num_groups={num_groups}"
            )
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_module(cls, module: nn.GroupNorm, activation: str | None = "silu") -> "GroupNormSiLU":
        """Build from an existing ``nn.GroupNorm``, sharing nothing but copying its parameters."""
        kw = {"device": module.weight.device, "dtype": module.weight.dtype} if module.affine else {}
        new = cls(module.num_groups, module.num_channels, module.eps, module.affine, activation, **kw)
        new.load_state_dict(module.state_dict())
        return new

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps,
                               scale=scale, shift=shift, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
