"""Non-causal softmax attention on (B, H, L, D) tensors with any strides.

Two implementations, chosen per call by ``jdm_fast.ops.backends.use_triton``:
- Triton (``jdm_fast.kernels.attention``): flash-style kernels registered as the custom op
  ``torch.ops.jdm_fast.attention_fwd`` (``triton_op``, fake, ``register_autograd``; the backward
  is the op ``attention_bwd``). Forward saves only the output and the fp32 log-sum-exp; backward
  recomputes the probabilities. q, k, v are read in place through their strides, so the strided
  views of a packed qkv tensor need no copies. Dots: fp16/bf16 inputs with fp32 accumulation;
  fp32 inputs with true fp32 (IEEE) dots. Head dims 16..256.
- Reference: ``torch.nn.functional.scaled_dot_product_attention`` (softmax in fp32).
"""
from __future__ import annotations

import numbers
import warnings

import torch
import torch.nn.functional as F
from torch.library import triton_op

from jdm_fast.ops.backends import current_backend, use_triton

MAX_HEAD_DIM = 256
MIN_TRITON_HEAD_DIM = 16
# Below this sequence length the default ("auto") backend runs SDPA on CUDA: on the H200
# (gpu_check, 2026-12-01) our kernels were 2.2x faster than the best SDPA backend forward and 1.2x
# forward+backward at L = 256, but 0.75x / 0.43x at L = 64 (too few query blocks to fill the GPU).
MIN_TRITON_SEQ = 128
# The kernels launch a (query blocks, B * H) grid: B * H is bounded by CUDA's grid y limit.
MAX_TRITON_BATCH_HEADS = 65535
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned_small_d = False


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, L, D), got shape {tuple(t.shape)}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"attention: q, k, v must have equal shapes (self-attention), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.shape[-1] < 1:
        raise ValueError(f"attention: head dim D must be >= 1, got shape {tuple(q.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D={q.shape[-1]} exceeds the supported maximum {MAX_HEAD_DIM}")


def _check_triton(q: torch.Tensor) -> None:
    """What the Triton kernels need beyond ``_check``: checked where the op chooses them."""
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"attention: q, k, v must be float32/float16/bfloat16 for the Triton kernels, got "
                        f"{q.dtype} (backend('reference') runs any floating dtype)")
    if q.shape[0] * q.shape[1] > MAX_TRITON_BATCH_HEADS:
        raise ValueError(f"attention: B * H = {q.shape[0] * q.shape[1]} exceeds {MAX_TRITON_BATCH_HEADS}, the "
                         "Triton kernels' limit (B * H is the CUDA grid's y axis)")


@triton_op("jdm_fast::attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from jdm_fast.kernels.attention import attention_fwd

    return attention_fwd(q, k, v, scale)


@_fwd.register_fake
def _fwd_fake(q, k, v, scale):
    from jdm_fast.kernels.attention import token_major

    b, h, length, d = q.shape
    o = q.new_empty((b, length, h, d)).transpose(1, 2) if token_major(q) else q.new_empty(q.shape)
    return o, q.new_empty((b, h, length), dtype=torch.float32)


@triton_op("jdm_fast::attention_bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from jdm_fast.kernels.attention import attention_bwd

    return attention_bwd(do, q, k, v, o, lse, scale)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """CPU: softmax(q k^T scale) v as two batched matmuls around a softmax (SDPA's math form).
    For the UNet's short sequences it beats SDPA's CPU flash kernel, whose backward on the
    channels-last path's token-major views took 4x longer (measured, 2-core AVX-512 CPU).
    The scale is applied to q (L x D, not the L x L scores) and the softmax runs in the input dtype:
    ATen's CPU softmax and its backward accumulate bf16/fp16 in fp32 and round once, which is what
    an fp32 softmax followed by a cast gave, without the four L x L dtype copies (forward and
    backward) that cost the CIFAR preset's L = 256 attention ~130 ms of a 2.1 s step."""
    p = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)), dim=-1)
    return torch.matmul(p, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, non-causal; q, k, v (B, H, L, D), any strides; scale = D**-0.5 by default.

    Returns (B, H, L, D) in the input dtype. Head dims up to 256 (Triton path: 16..256; smaller
    heads run the reference, with a one-time warning). On CUDA the default backend runs sequences
    shorter than ``MIN_TRITON_SEQ`` through SDPA (measured faster there); ``backend("triton")``
    forces the kernels at any length.
    """
    global _warned_small_d
    _check(q, k, v)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    d = q.shape[-1]
    scale = float(d ** -0.5 if scale is None else scale)
    if not use_triton(q.device, "attention") or q.numel() == 0:
        if q.device.type == "cpu":
            return _cpu_attention(q, k, v, scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if d < MIN_TRITON_HEAD_DIM:
        if not _warned_small_d:
            _warned_small_d = True
            warnings.warn(f"jdm_fast attention: head dim {d} < {MIN_TRITON_HEAD_DIM} runs the PyTorch reference",
                          stacklevel=2)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if q.shape[2] < MIN_TRITON_SEQ and current_backend() == "auto":
        # SDPA's fused backends need a unit head-dim stride (the channels-last path's views have it)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    _check_triton(q)
    out, _ = _fwd(q, k, v, scale)
    return out
