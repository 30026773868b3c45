"""A diffusers attention processor running jdm_fast's fused attention.

``use_fused_attention(model)`` -- or ``model.set_attn_processor(FusedAttnProcessor())`` on models
that have that method (diffusers 0.42's ``UNet2DModel`` does not; ``use_fused_attention`` then sets
the processor on every ``Attention`` module) -- gives the same outputs and gradients as diffusers'
default ``AttnProcessor2_0`` on self-attention layers, with the attention itself computed by
``jdm_fast.ops.attention`` (Triton on CUDA). diffusers is not a dependency of jdm_fast: this
module only touches the ``Attention`` object it is handed.
"""
from __future__ import annotations

import torch

from jdm_fast.ops import attention


class FusedAttnProcessor:
    """Self-attention processor for diffusers' ``Attention``; masks and cross-attention are refused."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("FusedAttnProcessor: cross-attention (encoder_hidden_states) is not supported; "
                             "use diffusers' AttnProcessor2_0 for those layers")
        if attention_mask is not None:
            raise ValueError("FusedAttnProcessor: attention_mask is not supported")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise ValueError("FusedAttnProcessor: q/k normalisation layers are not supported")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, L, heads*D) -> (B, heads, L, D) as strided views: no copies before the kernel
        q, k, v = (t.view(batch, length, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, length, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_fused_attention(model) -> int:
    """Put a :class:`FusedAttnProcessor` on every diffusers ``Attention`` in ``model``; returns how many."""
    processor = FusedAttnProcessor()
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(processor)
        return len(model.attn_processors)
    count = 0
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_q"):
            module.set_processor(processor)
            count += 1
    return count
