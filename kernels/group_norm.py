"""Fused GroupNorm -> FiLM scale/shift -> optional SiLU: Triton kernels and launchers.

Forward, per sample n and group g (statistics over the group's C/G channels x H x W, fp32)::

    xhat = (x - mean) * rstd                  rstd = 1 / sqrt(var + eps), biased variance
    a    = xhat * w[c] + b[c]
    z    = a * (1 + s[n, c]) + sh[n, c]
    y    = act(z)                             act = SiLU or identity

Backward (the equations the backward kernels implement)::

    dz            = dy * act'(z)              silu'(z) = sig(z) * (1 + z * (1 - sig(z)))
    dshift[n, c]  = sum_hw dz
    dscale[n, c]  = sum_hw dz * a
    da            = dz * (1 + s)
    dw[c]         = sum_{n, hw} da * xhat     (per-(n, c) fp32 partials, then a second kernel
    db[c]         = sum_{n, hw} da             sums over n in a fixed order: deterministic)
    dxhat         = da * w
    dx            = rstd * (dxhat - mean_grp(dxhat) - xhat * mean_grp(dxhat * xhat))

Since dxhat = da * w[c], the group means follow from the per-channel partials:
mean_grp(dxhat) = sum_c w[c] * db_part[n, c] / count, mean_grp(dxhat * xhat) = sum_c w[c] *
dw_part[n, c] / count, which is how the looped backward gets them in its reduction pass.

One program per (n, g). Each direction is one kernel with two variants, chosen by the constexpr
SINGLE_PASS: single-pass (the whole group is one [BLOCK_C, BLOCK_HW] register tile: x and dy read
once) and looped (chunks over channels and HW; the forward merges per-chunk (count, mean, M2)
with Chan's formula, never E[x^2] - E[x]^2). x / y / dy / dx are (N, C, H, W), contiguous or
channels_last: H and W are flattened with stride_hw = stride(3), which requires
stride(2) == W * stride(3).

Presence flags and the activation flag are plain ints (not constexpr, not specialized), so the
flags do not multiply compiled variants; SINGLE_PASS, BLOCK_C and BLOCK_HW are the only constexprs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import aot_signature, compile_options, launcher

_FLAGS = ["has_w", "has_b", "has_scale", "has_shift", "act"]


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _tile(base, ch, hw, s_c, s_hw):
    """Pointers to channels ``ch`` x flattened pixels ``hw`` of one sample: [BLOCK_C, BLOCK_HW]."""
    return base + ch[:, None] * s_c + hw[None, :] * s_hw


@triton.jit
def _load_channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n64, ch, c_mask, ss_n, ss_c, ssh_n, ssh_c,
                         has_w, has_b, has_scale, has_shift):
    """fp32 (w, b, s, sh) of channels ``ch`` of sample n: [BLOCK_C] each; an absent input or a
    masked channel reads as the identity (w = 1, b = s = sh = 0)."""
    w = tl.load(w_ptr + ch, mask=c_mask & (has_w != 0), other=1.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=c_mask & (has_b != 0), other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + n64 * ss_n + ch * ss_c, mask=c_mask & (has_scale != 0), other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + n64 * ssh_n + ch * ssh_c, mask=c_mask & (has_shift != 0), other=0.0).to(tl.float32)
    return w, b, s, sh


@triton.jit
def _act(z, act):
    """y = SiLU(z) when act, else z (fp32)."""
    return tl.where(act != 0, z / (1.0 + tl.exp(-z)), z)


@triton.jit
def _silu_grad(z):
    """d silu(z) / dz for fp32 z."""
    sig = 1.0 / (1.0 + tl.exp(-z))
    return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _act_grad(dy, a, s1, sh, act):
    """dz = dy * act'(z) at z = a * (1 + s) + sh, fp32; s1 = 1 + s and sh per channel. A masked
    lane has dy = 0, so dz = 0 there."""
    dz = dy.to(tl.float32)
    z = a * s1[:, None] + sh[:, None]
    return tl.where(act != 0, dz * _silu_grad(z), dz)


@triton.jit(do_not_specialize=_FLAGS)
def _gn_fwd_kernel(
    x_ptr,  # (N, C, H, W) input, any float dtype, strides below
    y_ptr,  # (N, C, H, W) output, x's dtype
    w_ptr,  # (C,) weight, or a dummy when has_w == 0
    b_ptr,  # (C,) bias, or a dummy when has_b == 0
    scale_ptr,  # (N, C) FiLM scale, or a dummy when has_scale == 0
    shift_ptr,  # (N, C) FiLM shift, or a dummy when has_shift == 0
    mean_ptr,  # (N, G) fp32 out: group mean
    rstd_ptr,  # (N, G) fp32 out: 1 / sqrt(var + eps)
    G,  # number of groups
    CG,  # channels per group, C // G
    HW,  # H * W
    sx_n, sx_c, sx_hw,  # x strides (elements) of n, c and the flattened h*w
    sy_n, sy_c, sy_hw,  # y strides
    ss_n, ss_c,  # scale strides
    ssh_n, ssh_c,  # shift strides
    eps,  # float; may arrive as fp64 under Inductor
    has_w, has_b, has_scale, has_shift,  # int 0/1 presence flags
    act,  # int: 1 = SiLU, 0 = identity
    SINGLE_PASS: tl.constexpr,  # the whole group is one tile (BLOCK_C >= CG, BLOCK_HW >= HW), else chunks
    BLOCK_C: tl.constexpr,  # channels per tile, power of 2
    BLOCK_HW: tl.constexpr,  # pixels per tile, power of 2
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    hh = tl.arange(0, BLOCK_HW)
    if SINGLE_PASS:  # x read once: two-pass statistics on the register tile
        c_mask = cc < CG
        mask = c_mask[:, None] & (hh < HW)[None, :]
        ch = g * CG + cc  # absolute channel index, [BLOCK_C]
        n64 = n.to(tl.int64)

        x = tl.load(_tile(x_ptr + n64 * sx_n, ch, hh, sx_c, sx_hw), mask=mask, other=0.0)
        x = x.to(tl.float32)
        count = tl.cast(CG * HW, tl.float32)  # a Python int when the JIT specializes CG = HW = 1
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        d = tl.where(mask, x - mean, 0.0)
        var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
        rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)

        w, b, s, sh = _load_channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n64, ch, c_mask, ss_n, ss_c,
                                           ssh_n, ssh_c, has_w, has_b, has_scale, has_shift)
        z = (d * rstd * w[:, None] + b[:, None]) * (1.0 + s[:, None]) + sh[:, None]
        z = _act(z, act)
        tl.store(_tile(y_ptr + n64 * sy_n, ch, hh, sy_c, sy_hw), z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        n64 = n.to(tl.int64)
        x_base = x_ptr + n64 * sx_n
        y_base = y_ptr + n64 * sy_n

        # pass 1: statistics, per-chunk (count, mean, M2) merged with Chan's formula
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for c0 in range(0, CG, BLOCK_C):
            c_mask = (c0 + cc) < CG
            ch = g * CG + c0 + cc
            nc = tl.minimum(CG - c0, BLOCK_C)
            for h0 in range(0, HW, BLOCK_HW):
                mask = c_mask[:, None] & ((h0 + hh) < HW)[None, :]
                x = tl.load(_tile(x_base, ch, h0 + hh, sx_c, sx_hw), mask=mask, other=0.0)
                x = x.to(tl.float32)
                nb = (nc * tl.minimum(HW - h0, BLOCK_HW)).to(tl.float32)
                bmean = tl.sum(tl.sum(x, axis=1), axis=0) / nb
                d = tl.where(mask, x - bmean, 0.0)
                bm2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
                tot = cnt + nb
                delta = bmean - mean
                mean = mean + delta * (nb / tot)
                m2 = m2 + bm2 + delta * delta * (cnt * (nb / tot))
                cnt = tot
        rstd = 1.0 / tl.sqrt(m2 / cnt + tl.cast(eps, tl.float32))
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)

        # pass 2: normalize, affine, FiLM, activation
        for c0 in range(0, CG, BLOCK_C):
            c_mask = (c0 + cc) < CG
            ch = g * CG + c0 + cc
            w, b, s, sh = _load_channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n64, ch, c_mask, ss_n, ss_c,
                                               ssh_n, ssh_c, has_w, has_b, has_scale, has_shift)
            wr = (w * rstd)[:, None]
            s1 = (1.0 + s)[:, None]
            sh = sh[:, None]
            for h0 in range(0, HW, BLOCK_HW):
                mask = c_mask[:, None] & ((h0 + hh) < HW)[None, :]
                x = tl.load(_tile(x_base, ch, h0 + hh, sx_c, sx_hw), mask=mask, other=0.0)
                z = ((x.to(tl.float32) - mean) * wr + b[:, None]) * s1 + sh
                z = _act(z, act)
                tl.store(_tile(y_base, ch, h0 + hh, sy_c, sy_hw), z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_FLAGS)
def _gn_bwd_kernel(
    dy_ptr,  # (N, C, H, W) upstream gradient, x's dtype, own strides
    x_ptr,  # (N, C, H, W) forward input
    dx_ptr,  # (N, C, H, W) out: input gradient, x's dtype and layout
    w_ptr,  # (C,) weight, or a dummy when has_w == 0
    b_ptr,  # (C,) bias, or a dummy when has_b == 0
    scale_ptr,  # (N, C) FiLM scale, or a dummy when has_scale == 0
    shift_ptr,  # (N, C) FiLM shift, or a dummy when has_shift == 0
    mean_ptr,  # (N, G) fp32 group mean from the forward
    rstd_ptr,  # (N, G) fp32 group rstd from the forward
    dw_part_ptr,  # (N, C) fp32 out: sum_hw da * xhat (written when has_w)
    db_part_ptr,  # (N, C) fp32 out: sum_hw da (written when has_b)
    dscale_ptr,  # (N, C) fp32 out, contiguous: sum_hw dz * a (written when has_scale)
    dshift_ptr,  # (N, C) fp32 out, contiguous: sum_hw dz (written when has_shift)
    C,  # channels
    G,  # number of groups
    CG,  # channels per group, C // G
    HW,  # H * W
    sdy_n, sdy_c, sdy_hw,  # dy strides
    sx_n, sx_c, sx_hw,  # x strides
    sdx_n, sdx_c, sdx_hw,  # dx strides
    ss_n, ss_c,  # scale strides
    ssh_n, ssh_c,  # shift strides
    has_w, has_b, has_scale, has_shift,  # int 0/1 presence flags
    act,  # int: 1 = SiLU, 0 = identity
    SINGLE_PASS: tl.constexpr,  # the whole group is one tile (BLOCK_C >= CG, BLOCK_HW >= HW), else chunks
    BLOCK_C: tl.constexpr,  # channels per tile, power of 2
    BLOCK_HW: tl.constexpr,  # pixels per tile, power of 2
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    hh = tl.arange(0, BLOCK_HW)
    if SINGLE_PASS:  # x and dy read once
        c_mask = cc < CG
        mask = c_mask[:, None] & (hh < HW)[None, :]
        ch = g * CG + cc
        n64 = n.to(tl.int64)
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)

        w, b, s, sh = _load_channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n64, ch, c_mask, ss_n, ss_c,
                                           ssh_n, ssh_c, has_w, has_b, has_scale, has_shift)

        x = tl.load(_tile(x_ptr + n64 * sx_n, ch, hh, sx_c, sx_hw), mask=mask, other=0.0)
        dy = tl.load(_tile(dy_ptr + n64 * sdy_n, ch, hh, sdy_c, sdy_hw), mask=mask, other=0.0)
        xhat = tl.where(mask, (x.to(tl.float32) - mean) * rstd, 0.0)
        a = xhat * w[:, None] + b[:, None]
        s1 = 1.0 + s
        dz = _act_grad(dy, a, s1, sh, act)

        dshift = tl.sum(dz, axis=1)
        dscale = tl.sum(dz * a, axis=1)
        row = n64 * C + ch
        tl.store(dshift_ptr + row, dshift, mask=c_mask & (has_shift != 0))
        tl.store(dscale_ptr + row, dscale, mask=c_mask & (has_scale != 0))
        da = dz * s1[:, None]
        dw_part = tl.sum(da * xhat, axis=1)
        db_part = tl.sum(da, axis=1)
        tl.store(dw_part_ptr + row, dw_part, mask=c_mask & (has_w != 0))
        tl.store(db_part_ptr + row, db_part, mask=c_mask & (has_b != 0))

        count = tl.cast(CG * HW, tl.float32)  # a Python int when the JIT specializes CG = HW = 1
        m1 = tl.sum(w * db_part, axis=0) / count  # mean_grp(dxhat)
        m2 = tl.sum(w * dw_part, axis=0) / count  # mean_grp(dxhat * xhat)
        dx = rstd * (da * w[:, None] - m1 - xhat * m2)
        tl.store(_tile(dx_ptr + n64 * sdx_n, ch, hh, sdx_c, sdx_hw), dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        n64 = n.to(tl.int64)
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)
        x_base = x_ptr + n64 * sx_n
        dy_base = dy_ptr + n64 * sdy_n
        dx_base = dx_ptr + n64 * sdx_n

        # pass 1: per-channel sums, and the two group sums sum_c w * db_part, sum_c w * dw_part
        sum1 = 0.0
        sum2 = 0.0
        for c0 in range(0, CG, BLOCK_C):
            c_mask = (c0 + cc) < CG
            ch = g * CG + c0 + cc
            w, b, s, sh = _load_channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n64, ch, c_mask, ss_n, ss_c,
                                               ssh_n, ssh_c, has_w, has_b, has_scale, has_shift)
            s1 = 1.0 + s
            acc_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
            acc_dza = tl.zeros([BLOCK_C], dtype=tl.float32)
            acc_dzx = tl.zeros([BLOCK_C], dtype=tl.float32)  # sum_hw dz * xhat
            for h0 in range(0, HW, BLOCK_HW):
                mask = c_mask[:, None] & ((h0 + hh) < HW)[None, :]
                x = tl.load(_tile(x_base, ch, h0 + hh, sx_c, sx_hw), mask=mask, other=0.0)
                dy = tl.load(_tile(dy_base, ch, h0 + hh, sdy_c, sdy_hw), mask=mask, other=0.0)
                xhat = tl.where(mask, (x.to(tl.float32) - mean) * rstd, 0.0)
                a = xhat * w[:, None] + b[:, None]
                dz = _act_grad(dy, a, s1, sh, act)
                acc_dz += tl.sum(dz, axis=1)
                acc_dza += tl.sum(dz * a, axis=1)
                acc_dzx += tl.sum(dz * xhat, axis=1)
            row = n64 * C + ch
            tl.store(dshift_ptr + row, acc_dz, mask=c_mask & (has_shift != 0))
            tl.store(dscale_ptr + row, acc_dza, mask=c_mask & (has_scale != 0))
            dw_part = acc_dzx * s1  # (1 + s) is constant per (n, c): sum da*xhat = (1+s) sum dz*xhat
            db_part = acc_dz * s1
            tl.store(dw_part_ptr + row, dw_part, mask=c_mask & (has_w != 0))
            tl.store(db_part_ptr + row, db_part, mask=c_mask & (has_b != 0))
            sum1 += tl.sum(tl.where(c_mask, w * db_part, 0.0), axis=0)
            sum2 += tl.sum(tl.where(c_mask, w * dw_part, 0.0), axis=0)

        count = tl.cast(CG * HW, tl.float32)  # a Python int when the JIT specializes CG = HW = 1
        m1 = sum1 / count  # mean_grp(dxhat)
        m2 = sum2 / count  # mean_grp(dxhat * xhat)

        # pass 2: dx
        for c0 in range(0, CG, BLOCK_C):
            c_mask = (c0 + cc) < CG
            ch = g * CG + c0 + cc
            w, b, s, sh = _load_channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n64, ch, c_mask, ss_n, ss_c,
                                               ssh_n, ssh_c, has_w, has_b, has_scale, has_shift)
            s1 = 1.0 + s
            for h0 in range(0, HW, BLOCK_HW):
                mask = c_mask[:, None] & ((h0 + hh) < HW)[None, :]
                x = tl.load(_tile(x_base, ch, h0 + hh, sx_c, sx_hw), mask=mask, other=0.0)
                dy = tl.load(_tile(dy_base, ch, h0 + hh, sdy_c, sdy_hw), mask=mask, other=0.0)
                xhat = (x.to(tl.float32) - mean) * rstd
                a = xhat * w[:, None] + b[:, None]
                dz = _act_grad(dy, a, s1, sh, act)
                dx = rstd * (dz * (s1 * w)[:, None] - m1 - xhat * m2)
                tl.store(_tile(dx_base, ch, h0 + hh, sdx_c, sdx_hw), dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_over_n_kernel(
    part_ptr,  # (N, C) fp32 contiguous per-sample partials
    out_ptr,  # (C,) out: sum over n, in the parameter's dtype
    N,  # samples
    C,  # channels
    BLOCK: tl.constexpr,  # channels per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(0, N):  # fixed order: bit-identical across runs
        acc += tl.load(part_ptr + n * C + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_REDUCE_BLOCK = 256


# ------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class GNConfig:
    """One launch configuration of the forward and backward kernels: which variant and its tile."""

    single_pass: bool  # whole group in one register tile (else chunks, looped over)
    block_c: int  # BLOCK_C, power of 2
    block_hw: int  # BLOCK_HW, power of 2
    num_warps: int

    def launch(self, kind: str) -> tuple[dict, dict]:
        """(constexprs, options) the "fwd" or "bwd" kernel is launched and compiled with."""
        if kind not in ("fwd", "bwd"):
            raise ValueError(f"launch: kind must be 'fwd' or 'bwd', got {kind!r}")
        return ({"SINGLE_PASS": self.single_pass, "BLOCK_C": self.block_c, "BLOCK_HW": self.block_hw},
                {"num_warps": self.num_warps})


_MAX_TILE = 4096
_MAX_BLOCK_C = 64
_HW_BLOCKS = (64, 256, 1024, 4096)


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def _warps(tile: int) -> int:
    return 1 if tile <= 256 else 2 if tile <= 512 else 4 if tile <= 2048 else 8


def pick_config(channels_per_group: int, hw: int) -> GNConfig:
    """The launch config for a group of ``channels_per_group`` channels x ``hw`` pixels."""
    if channels_per_group < 1 or hw < 1:
        raise ValueError(f"pick_config: channels_per_group={channels_per_group} and hw={hw} must be >= 1")
    bc = _next_pow2(channels_per_group)
    if bc <= _MAX_BLOCK_C:
        bhw = next((b for b in _HW_BLOCKS if b >= hw), None)
        if bhw is not None and bc * bhw <= _MAX_TILE:
            return GNConfig(True, bc, bhw, _warps(bc * bhw))
    bc = min(bc, _MAX_BLOCK_C)
    bhw = max(_MAX_TILE // bc, 64)
    return GNConfig(False, bc, bhw, _warps(bc * bhw))


def _all_configs() -> tuple[GNConfig, ...]:
    out = []
    for bc in (1 << i for i in range(7)):  # 1 .. 64
        out += [GNConfig(True, bc, bhw, _warps(bc * bhw)) for bhw in _HW_BLOCKS if bc * bhw <= _MAX_TILE]
        bhw = max(_MAX_TILE // bc, 64)
        out.append(GNConfig(False, bc, bhw, _warps(bc * bhw)))
    return tuple(out)


ALL_CONFIGS: tuple[GNConfig, ...] = _all_configs()  # every config pick_config can return (23)


# ------------------------------------------------------------------------------------ launchers
# Inputs are valid: jdm_fast.ops.group_norm_silu checks them, once, with messages for users.
def _hw_stride(t: torch.Tensor) -> int:
    """The step of one pixel of the flattened H * W: stride(3), or stride(2) when W == 1."""
    # Other layouts would make the kernels store outside the tensor: the op copies them first.
    assert t.shape[2] <= 1 or t.shape[3] <= 1 or t.stride(2) == t.shape[3] * t.stride(3), \
        f"H and W of a tensor of strides {t.stride()} do not flatten to one stride"
    return t.stride(3) if t.shape[3] > 1 else t.stride(2)


def _config(config: GNConfig | None, cg: int, hw: int, fn: str) -> GNConfig:
    if config is None:
        return pick_config(cg, hw)
    if not isinstance(config, GNConfig):
        raise TypeError(f"{fn}: config must be a GNConfig or None, got {type(config).__name__}")
    if config.single_pass and (config.block_c < cg or config.block_hw < hw):
        raise ValueError(f"{fn}: single-pass config {config} does not cover a group of {cg} x {hw}")
    return config


# Every output buffer comes from these two functions, so tests can poison (NaN-fill) them.
def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)  # keeps t's layout: channels_last in, channels_last out


def _empty(shape: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=dtype)


def group_norm_fwd(x, weight, bias, scale, shift, num_groups: int, eps: float, act: bool,
                   config: GNConfig | None = None):
    """Forward. Returns (y like x (dtype and layout), mean (N, G) fp32, rstd (N, G) fp32).

    x: (N, C, H, W) with stride(2) == W * stride(3) (contiguous or channels_last), C divisible by
    num_groups; weight/bias: (C,) contiguous, or None; scale/shift: (N, C), any strides, or None;
    every tensor float32/float16/bfloat16 on x's device. ``config`` forces a launch config (tests).
    """
    n, c, h, w_ = x.shape
    cg, hw = c // num_groups, h * w_
    cfg = _config(config, cg, hw, "group_norm_fwd")
    y = _empty_like(x)
    mean = _empty((n, num_groups), x.device)
    rstd = _empty((n, num_groups), x.device)
    if x.numel() == 0:
        return y, mean, rstd
    const, options = cfg.launch("fwd")
    sc = scale if scale is not None else x
    sh = shift if shift is not None else x
    launcher(_gn_fwd_kernel)[(n * num_groups,)](
        x, y,
        weight if weight is not None else mean, bias if bias is not None else mean, sc, sh,
        mean, rstd,
        num_groups, cg, hw,
        x.stride(0), x.stride(1), _hw_stride(x),
        y.stride(0), y.stride(1), _hw_stride(y),
        sc.stride(0), sc.stride(1) if sc.dim() > 1 else 0,
        sh.stride(0), sh.stride(1) if sh.dim() > 1 else 0,
        float(eps),
        int(weight is not None), int(bias is not None), int(scale is not None), int(shift is not None),
        int(bool(act)),
        **const, **options,
    )
    return y, mean, rstd


def _sum_over_n(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, c = part.shape
    out = _empty((c,), part.device, dtype)
    if c == 0:
        return out
    launcher(_sum_over_n_kernel)[(triton.cdiv(c, _REDUCE_BLOCK),)](
        part, out, n, c, BLOCK=_REDUCE_BLOCK, **compile_options(None, "reduce"))
    return out


def group_norm_bwd(dy, x, weight, bias, scale, shift, mean, rstd, num_groups: int, act: bool,
                   config: GNConfig | None = None):
    """Backward. Returns (dx like x, dweight, dbias, dscale, dshift).

    dy: x's shape, dtype and device, with stride(2) == W * stride(3); mean/rstd: the forward's.
    Each parameter gradient is None when its input was None, else in that input's dtype and
    shape (dscale/dshift contiguous). dweight/dbias are deterministic (no atomics).
    """
    n, c, h, w_ = x.shape
    cg, hw = c // num_groups, h * w_
    cfg = _config(config, cg, hw, "group_norm_bwd")
    dx = _empty_like(x)

    def part(present):  # (N, C) fp32 buffer, or a dummy fp32 pointer never written
        return _empty((n, c), x.device) if present else mean

    dw_part, db_part = part(weight is not None), part(bias is not None)
    dscale, dshift = part(scale is not None), part(shift is not None)
    if x.numel() > 0:
        const, options = cfg.launch("bwd")
        sc = scale if scale is not None else x
        sh = shift if shift is not None else x
        launcher(_gn_bwd_kernel)[(n * num_groups,)](
            dy, x, dx,
            weight if weight is not None else mean, bias if bias is not None else mean, sc, sh,
            mean, rstd,
            dw_part, db_part, dscale, dshift,
            c, num_groups, cg, hw,
            dy.stride(0), dy.stride(1), _hw_stride(dy),
            x.stride(0), x.stride(1), _hw_stride(x),
            dx.stride(0), dx.stride(1), _hw_stride(dx),
            sc.stride(0), sc.stride(1) if sc.dim() > 1 else 0,
            sh.stride(0), sh.stride(1) if sh.dim() > 1 else 0,
            int(weight is not None), int(bias is not None), int(scale is not None), int(shift is not None),
            int(bool(act)),
            **const, **options,
        )
    else:
        for t in (dw_part, db_part, dscale, dshift):
            if t is not mean:
                t.zero_()
    dweight = _sum_over_n(dw_part, weight.dtype) if weight is not None else None
    dbias = _sum_over_n(db_part, bias.dtype) if bias is not None else None
    dscale = dscale.to(scale.dtype) if scale is not None else None
    dshift = dshift.to(shift.dtype) if shift is not None else None
    return dx, dweight, dbias, dscale, dshift


# ------------------------------------------------------------------------------------ AOT helpers
KERNELS = {"fwd": _gn_fwd_kernel, "bwd": _gn_bwd_kernel, "reduce": _sum_over_n_kernel}
# The dtype of each pointer argument of the kernels, by name: the tensor it takes its dtype from
# (aot_compile_args' arguments: "x", "weight", "bias", "scale", "shift"), or a fixed dtype.
_POINTERS = {"x_ptr": "x", "y_ptr": "x", "dy_ptr": "x", "dx_ptr": "x", "out_ptr": "x",
             "w_ptr": "weight", "b_ptr": "bias", "scale_ptr": "scale", "shift_ptr": "shift",
             "mean_ptr": "fp32", "rstd_ptr": "fp32", "dw_part_ptr": "fp32", "db_part_ptr": "fp32",
             "dscale_ptr": "fp32", "dshift_ptr": "fp32", "part_ptr": "fp32"}


def aot_compile_args(kernel_kind: str, cfg: GNConfig | None, dtype, weight_dtype="fp32", bias_dtype=None,
                     scale_dtype=None, shift_dtype=None, eps_dtype="fp32", ones: tuple[str, ...] = ()):
    """(fn, signature, constexprs) for ``triton.compile(ASTSource(fn, signature, constexprs))``.

    kernel_kind: "fwd" / "bwd" (compiled with ``cfg.launch(kind)``) or "reduce" (cfg ignored;
    ``dtype`` is then the parameter gradient's). dtype: x's (and y's, dy's, dx's), "fp32" /
    "fp16" / "bf16" or a torch dtype. weight_dtype; bias_dtype (default: weight's); scale_dtype
    (default: x's); shift_dtype (default: scale's); eps_dtype: "fp64" is what Inductor passes.
    ``ones`` names integer arguments compiled as the constant 1, as Triton <= 3.6's JIT
    specializes an int equal to 1 (one-element groups: CG = HW = 1; unit strides).
    """
    if kernel_kind not in KERNELS:
        raise ValueError(f"aot_compile_args: kernel_kind must be one of {tuple(KERNELS)}, got {kernel_kind!r}")
    if kernel_kind == "reduce":
        const = {"BLOCK": _REDUCE_BLOCK}
    elif cfg is None:
        raise ValueError("aot_compile_args: cfg is required for 'fwd' and 'bwd'")
    else:
        const = cfg.launch(kernel_kind)[0]
    scale_dtype = scale_dtype or dtype
    dtypes = {"x": dtype, "weight": weight_dtype, "bias": bias_dtype or weight_dtype, "scale": scale_dtype,
              "shift": shift_dtype or scale_dtype}
    pointers = {name: dtypes.get(source, source) for name, source in _POINTERS.items()}
    fn = KERNELS[kernel_kind]
    sig, const = aot_signature(fn, pointers, const, scalars={"eps": eps_dtype}, ones=ones)
    return fn, sig, const
