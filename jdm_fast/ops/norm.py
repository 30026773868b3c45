"""GroupNorm -> optional FiLM scale-shift -> optional SiLU, as one op.

``y = act(((x - mean_g) * rstd_g * weight_c + bias_c) * (1 + scale_nc) + shift_nc)``

Three implementations, chosen per call (``jdm_fast.ops.backends``):
- Triton (``jdm_fast.kernels.group_norm``): the custom op ``torch.ops.jdm_fast.group_norm_silu_fwd``
  registered with ``torch.library.triton_op`` (Inductor sees the kernels), a fake implementation,
  and ``register_autograd`` whose backward is itself the op ``group_norm_silu_bwd``. Backward saves
  only x, the fp32 mean/rstd and the (small) affine/FiLM inputs, and recomputes the rest.
- C++ (CPU tensors, ``jdm_fast._C``: csrc/norm_cpu.cpp): ``group_norm_silu_cpu`` and its
  backward op, the same equations in one pass per statistic, the default on CPUs.
- Reference: the same math in PyTorch with fp32 statistics; autograd is PyTorch's own, so it is
  an independent oracle for the kernels (``backend("reference")``; also where _C is missing).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.library import triton_op

from jdm_fast.ops.backends import current_backend, use_triton
from jdm_fast.ops.noise import HAS_C

ACTIVATIONS = ("silu", None)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _film(name: str, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"group_norm_silu: {name} must be a floating tensor, got {getattr(t, 'dtype', type(t))}")
    n, c = x.shape[:2]
    if t.shape not in ((n, c), (n, c) + (1,) * (x.dim() - 2)):
        raise ValueError(f"group_norm_silu: {name} must have shape ({n}, {c}), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"group_norm_silu: {name} is on {t.device} but x is on {x.device}")
    return t.reshape(n, c)


def _affine(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"group_norm_silu: {name} must be a floating tensor, got {getattr(t, 'dtype', type(t))}")
    if t.shape != (x.shape[1],):
        raise ValueError(f"group_norm_silu: {name} must have shape ({x.shape[1]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"group_norm_silu: {name} is on {t.device} but x is on {x.device}")


def _check_triton(**tensors: torch.Tensor | None) -> None:
    """What the Triton kernels need beyond the checks every backend makes: checked where the op
    chooses them (the kernels' launchers trust their inputs)."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in _TRITON_DTYPES:
            raise TypeError(f"group_norm_silu: {name} must be float32/float16/bfloat16 for the Triton kernels, "
                            f"got {t.dtype} (backend('reference') runs any floating dtype)")


def reference(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, activation="silu"):
    """The PyTorch reference (fp32 statistics and math, output in x's dtype); validated inputs."""
    c, extra = x.shape[1], (1,) * (x.dim() - 2)
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale.float().reshape(-1, c, *extra))
    if shift is not None:
        y = y + shift.float().reshape(-1, c, *extra)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------ the Triton op
@triton_op("jdm_fast::group_norm_silu_fwd", mutates_args=())
def _fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
         shift: torch.Tensor | None, num_groups: int, eps: float, act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from jdm_fast.kernels.group_norm import group_norm_fwd

    return group_norm_fwd(x, weight, bias, scale, shift, num_groups, eps, bool(act))


@_fwd.register_fake
def _fwd_fake(x, weight, bias, scale, shift, num_groups, eps, act):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@triton_op("jdm_fast::group_norm_silu_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
         scale: torch.Tensor | None, shift: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
         num_groups: int, act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight, dbias, dscale, dshift; an absent input's gradient is an empty tensor."""
    from jdm_fast.kernels.group_norm import group_norm_bwd

    grads = group_norm_bwd(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, bool(act))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_bwd.register_fake
def _bwd_fake(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, act):
    like = [weight, bias, scale, shift]
    return (torch.empty_like(x), *[torch.empty_like(t) if t is not None else x.new_empty(0) for t in like])


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, _eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    if dy.shape[2] > 1 and dy.shape[3] > 1 and dy.stride(2) != dy.shape[3] * dy.stride(3):
        # the kernels flatten H, W (see kernels.group_norm._hw_stride): give dy x's layout
        dy = dy.contiguous(memory_format=memory_format_of(x))
    dx, dw, db, ds, dsh = _bwd(dy, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.act)
    present = [weight, bias, scale, shift]
    return (dx, *[g if t is not None else None for g, t in zip((dw, db, ds, dsh), present)], None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ CPU kernels (C++)
# jdm_fast._C's group_norm_silu_cpu / _backward (csrc/norm_cpu.cpp): the fused path on CPU tensors.
# Their schemas come with the extension; fakes and autograd are registered here when it loaded.
if HAS_C:
    @torch.library.register_fake("jdm_fast::group_norm_silu_cpu")
    def _cpu_fwd_fake(x, weight, bias, scale, shift, num_groups, eps, act):
        stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake("jdm_fast::group_norm_silu_cpu_backward")
    def _cpu_bwd_fake(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, act):
        like = [weight, bias, scale, shift]
        return (torch.empty_like(x), *[torch.empty_like(t) if t is not None else x.new_empty(0) for t in like])

    def _cpu_backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        dx, dw, db, ds, dsh = torch.ops.jdm_fast.group_norm_silu_cpu_backward(
            dy, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, bool(ctx.act))
        present = [weight, bias, scale, shift]
        return (dx, *[g if t is not None else None for g, t in zip((dw, db, ds, dsh), present)], None, None, None)

    torch.library.register_autograd("jdm_fast::group_norm_silu_cpu", _cpu_backward, setup_context=_setup_context)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor dense in that layout only, else ``torch.contiguous_format``."""
    return torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                   and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format


# ------------------------------------------------------------------------------ public function
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

    x: (N, C, *spatial) fp32/fp16/bf16, contiguous or channels_last (other layouts are copied to
    contiguous); weight/bias: (C,) fp32 or x's dtype, or None; scale/shift: (N, C), or None.
    Statistics and math in fp32; returns x's dtype, shape and layout.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"group_norm_silu: x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c < 1:
        raise ValueError(f"group_norm_silu: x must have at least one channel, got shape {tuple(x.shape)}")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"group_norm_silu: num_channels={c} must be divisible by num_groups={num_groups}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm_silu: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"group_norm_silu: eps must be a finite number > 0, got {eps!r}")
    _affine("weight", weight, x)
    _affine("bias", bias, x)
    scale, shift = _film("scale", scale, x), _film("shift", shift, x)
    triton = use_triton(x.device, "group_norm_silu")
    cpu_kernel = not triton and HAS_C and x.device.type == "cpu" and current_backend() == "auto"
    if not (triton or cpu_kernel) or x.numel() == 0:
        return reference(x, num_groups, weight, bias, eps, scale, shift, activation)
    if triton:
        _check_triton(x=x, weight=weight, bias=bias, scale=scale, shift=shift)
        weight, bias = (t if t is None else t.contiguous() for t in (weight, bias))  # the kernels read (C,) densely
    x4 = x if x.dim() == 4 else x.reshape(x.shape[0], c, -1, 1)  # (N, C, L) / 5-D: flatten space
    if not (x4.is_contiguous() or x4.is_contiguous(memory_format=torch.channels_last)):
        x4 = x4.contiguous()  # an unusual layout: one copy, then the kernel's NCHW path
    fwd = _fwd if triton else torch.ops.jdm_fast.group_norm_silu_cpu
    act = int(activation == "silu")
    y, _, _ = fwd(x4, weight, bias, scale, shift, num_groups, float(eps), act if triton else bool(act))
    return y if x.dim() == 4 else y.reshape(x.shape)
