"""ADM self-attention block over a 2-D feature map."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jdm_fast.nn.norm import GroupNormSiLU
from jdm_fast.ops import attention
from jdm_fast.ops.norm import memory_format_of


class SelfAttention2d(nn.Module):
    """GroupNorm -> 1x1 qkv -> multi-head attention -> 1x1 projection (zero-initialised) -> residual.

    Give either ``num_heads`` or ``num_head_channels`` (ADM's two ways to size the heads).
    q, k, v are strided views of the packed qkv tensor (no copies): the layout is
    (B, 3, heads, head_dim, L), so the fused attention op can read it in place. A channels-last
    input (B, H, W, C in memory) takes the token-major path instead: the 1x1 projections are
    matmuls on the (B, L, C) view, q, k, v strided views of the packed (B, L, 3, heads, head_dim)
    tensor, and the output is channels-last again; no layout copies of the feature map.
    """

    def __init__(self, channels: int, num_heads: int | None = None, num_head_channels: int | None = None,
                 num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if (num_heads is None) == (num_head_channels is None):
            raise ValueError("SelfAttention2d: give exactly one of num_heads and num_head_channels")
        if num_head_channels is not None:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(f"SelfAttention2d: channels={channels} not divisible by "
                                 f"num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"SelfAttention2d: channels={channels} not divisible by num_heads={num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = GroupNormSiLU(num_groups, channels, eps=eps, activation=None)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        if c != self.channels:
            raise ValueError(f"SelfAttention2d: expected {self.channels} channels, got {c}")
        if memory_format_of(x) == torch.channels_last:
            return self._forward_channels_last(x)
        seq = x.reshape(b, c, -1)
        length = seq.shape[-1]
        qkv = self.qkv(self.norm(seq)).reshape(b, 3, self.num_heads, c // self.num_heads, length)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, H, L, D) strided views
        out = attention(q, k, v)  # (B, H, L, D)
        out = out.transpose(-1, -2).reshape(b, c, length)
        return x + self.proj_out(out).reshape(b, c, *spatial)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads = self.num_heads
        seq = x.reshape(b, c, hgt * wid)  # a view: (B, C, L) with unit channel stride
        tokens = self.norm(seq).transpose(1, 2)  # (B, L, C) view of the channels-last norm output
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)  # (B, L, 3C)
        qkv = qkv.reshape(b, hgt * wid, 3, heads, c // heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) strided views
        out = attention(q, k, v).transpose(1, 2).reshape(b, hgt * wid, c)  # (B, L, C)
        proj = F.linear(out, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + proj.reshape(b, hgt, wid, c).permute(0, 3, 1, 2)  # channels-last (B, C, H, W)
