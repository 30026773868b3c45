"""Views and reductions whose gradients keep the layout of their inputs.

Autograd's own backward of a batch slice (``x[:b]``) is a zero tensor in the default (NCHW)
layout with the gradient copied in, of a channel concatenation a channel slice of the output's
gradient (strided in either layout), and of a spatial mean an expanded (stride-0) tensor that
the next op materialises in NCHW. In a channels-last network every one of those gradients then
meets a channels-last one in an accumulation or a kernel, and the mixed-layout elementwise ops
run ~15x slower than same-layout ones on a CPU (measured: an ``add_`` of two 128 x 32 x 28 x 28
bf16 tensors 0.42 ms in one layout, 6.9 ms NCHW + channels-last). The three functions here
compute the same values as ``torch.split``, ``torch.cat`` and ``x.float().mean((2, 3))`` and give
each input a dense gradient in that input's own layout (``torch.empty_like`` preserves it).
"""
from __future__ import annotations

import torch

from jdm_fast.ops.norm import memory_format_of


def _like(meta: tuple, fill: torch.Tensor) -> torch.Tensor:
    """A dense tensor of ``meta`` = (shape, dtype, device, layout) holding ``fill`` (broadcast)."""
    shape, dtype, device, layout = meta
    return torch.empty(shape, dtype=dtype, device=device, memory_format=layout).copy_(fill)


def _meta(x: torch.Tensor) -> tuple:
    # what backward needs of an input: not the tensor (saving it would keep it alive until backward)
    return x.shape, x.dtype, x.device, memory_format_of(x)


class _SplitBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, b: int):
        ctx.set_materialize_grads(False)  # an unused half's gradient stays None (zeros written below)
        ctx.b, ctx.meta = b, _meta(x)
        return x[:b], x[b:]

    @staticmethod
    def backward(ctx, g1: torch.Tensor | None, g2: torch.Tensor | None):
        shape, dtype, device, layout = ctx.meta
        grad = torch.empty(shape, dtype=dtype, device=device, memory_format=layout)
        for part, g in ((grad[:ctx.b], g1), (grad[ctx.b:], g2)):
            if g is None:
                part.zero_()
            else:
                part.copy_(g)
        return grad, None


class _CatChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor):
        ctx.metas = _meta(a), _meta(b)
        return torch.cat([a, b], dim=1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ma, mb = ctx.metas
        ca = ma[0][1]
        return _like(ma, g[:, :ca]), _like(mb, g[:, ca:])


class _SpatialMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.meta = _meta(x)
        return x.mean(dim=(2, 3), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        shape = ctx.meta[0]
        return _like(ctx.meta, (g / (shape[2] * shape[3]))[:, :, None, None].expand(shape))


def split_batch(x: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x[:b], x[b:])`` (views); the gradient of ``x`` is one dense tensor in ``x``'s layout."""
    if not 0 <= b <= x.shape[0]:
        raise ValueError(f"split_batch: b={b} outside 0..{x.shape[0]}")
    return _SplitBatch.apply(x, b)


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)``; the gradients of ``a`` and ``b`` are dense in their own layouts."""
    return _CatChannels.apply(a, b)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.float().mean(dim=(2, 3))`` of a (N, C, H, W) tensor, accumulated in float32 (on CUDA without
    a float32 copy of ``x``; ATen's CPU reduction still casts the input first, ~4.5 ms of the digits
    step on a 2-core Xeon); the gradient of ``x`` is dense in ``x``'s layout and dtype."""
    if x.dim() != 4:
        raise ValueError(f"spatial_mean: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    return _SpatialMean.apply(x)
