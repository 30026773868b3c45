"""Non-causal softmax attention on (B, H, L, D) tensors.

Reference path: ``torch.nn.functional.scaled_dot_product_attention`` (softmax in fp32 on every
backend it picks). The fused Triton kernel of issue 4 replaces it behind this function; q, k, v
may be strided views of a packed qkv tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with scale = D**-0.5 by default; returns (B, H, L, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating tensor, got {t.dtype}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"attention: q, k, v must have equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
