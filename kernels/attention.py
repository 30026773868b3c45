"""Flash-style non-causal softmax attention for UNet shapes: Triton kernels and launchers.

q, k, v, do: (B, H, L, D) with any strides (e.g. strided views of a packed qkv tensor; never
copied). One program per (query block, b * h) in the forward; scores in fp32 with an online
softmax (exp2 of log2(e)-prescaled scores)::

    S   = scale * Q K^T                       (L x L per (b, h); padded keys -> -inf)
    lse = logsumexp(S, axis=-1)               natural log, fp32, (B, H, L)
    O   = exp(S - lse) V

Backward (the equations the backward kernels implement; probabilities recomputed from lse)::

    P     = exp(S - lse)
    delta = rowsum(dO * O)                    fp32 (B, H, L), small preprocess kernel
    dV    = P^T dO
    dP    = dO V^T
    dS    = P * (dP - delta)
    dQ    = scale * dS K
    dK    = scale * dS^T Q

dK and dV come from one kernel (one program per key block per (b, h), looping over query
blocks), dQ from another (one program per query block, looping over key blocks): no atomics,
so gradients are bit-identical across runs.

Precision: fp16 / bf16 inputs use tl.dot on the input dtype with fp32 accumulation (P and dS are
rounded to the input dtype before their dots, as in FlashAttention). fp32 inputs use tl.dot with
input_precision="ieee": true fp32 dots, no TF32.

Any L >= 1 (partial blocks masked), D in [16, 256]: BLOCK_D is the next power of two >= D in
{16, 32, 64, 128, 256} and the D tail is masked on loads and stores. ``scale`` is a Python float
cast inside the kernels (Inductor may pass it as fp64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import aot_signature, launcher

# Scores are kept in log2 units inside the kernels (exp2 is one instruction): exp(x) = exp2(x * log2(e)).
_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * ln(2)


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, H, L, D) queries, fp32/fp16/bf16, strides below
    k_ptr,  # (B, H, L, D) keys, q's dtype
    v_ptr,  # (B, H, L, D) values, q's dtype
    o_ptr,  # (B, H, L, D) out: attention output, q's dtype
    lse_ptr,  # (B, H, L) fp32 out, contiguous: natural-log logsumexp of the scaled scores
    sq_b, sq_h, sq_l, sq_d,  # q strides (elements)
    sk_b, sk_h, sk_l, sk_d,  # k strides
    sv_b, sv_h, sv_l, sv_d,  # v strides
    so_b, so_h, so_l, so_d,  # o strides
    H,  # heads
    L,  # sequence length (queries = keys)
    D,  # head dim, <= BLOCK_D
    scale,  # float softmax scale; may arrive as fp64 under Inductor
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < L
    d_mask = offs_d < D
    qk_scale = tl.cast(scale, tl.float32) * _LOG2E  # scores in log2 units

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):  # every block holds >= 1 real key: m_i is finite after the first
        n_mask = (n0 + offs_n) < L
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + (n0 + offs_n)[:, None] * sk_l + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + (n0 + offs_n)[:, None] * sv_l + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :] * so_d,
             acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    lse = (m_i + tl.log2(l_i)) * _LN2  # back to natural log
    tl.store(lse_ptr + pid_bh.to(tl.int64) * L + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr,  # (B, H, L, D) forward output
    do_ptr,  # (B, H, L, D) upstream gradient, o's dtype, own strides
    delta_ptr,  # (B, H, L) fp32 out, contiguous: rowsum(dO * O)
    so_b, so_h, so_l, so_d,  # o strides
    sdo_b, sdo_h, sdo_l, sdo_d,  # do strides
    H,  # heads
    L,  # sequence length
    D,  # head dim, <= BLOCK_D
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < L
    mask = m_mask[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :] * so_d, mask=mask, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :] * sdo_d, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * L + offs_m, delta, mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # (B, H, L, D) queries
    k_ptr,  # (B, H, L, D) keys
    v_ptr,  # (B, H, L, D) values
    do_ptr,  # (B, H, L, D) upstream gradient
    lse_ptr,  # (B, H, L) fp32 contiguous logsumexp from the forward
    delta_ptr,  # (B, H, L) fp32 contiguous rowsum(dO * O)
    dk_ptr,  # (B, H, L, D) out: key gradient, q's dtype
    dv_ptr,  # (B, H, L, D) out: value gradient, q's dtype
    sq_b, sq_h, sq_l, sq_d,  # q strides
    sk_b, sk_h, sk_l, sk_d,  # k strides
    sv_b, sv_h, sv_l, sv_d,  # v strides
    sdo_b, sdo_h, sdo_l, sdo_d,  # do strides
    sdk_b, sdk_h, sdk_l, sdk_d,  # dk strides
    sdv_b, sdv_h, sdv_l, sdv_d,  # dv strides
    H,  # heads
    L,  # sequence length
    D,  # head dim, <= BLOCK_D
    scale,  # float softmax scale; may arrive as fp64 under Inductor
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < L
    d_mask = offs_d < D
    kv_mask = n_mask[:, None] & d_mask[None, :]
    sc = tl.cast(scale, tl.float32)
    qk_scale = sc * _LOG2E

    k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_l + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sdo_b + h * sdo_h
    row_base = pid_bh.to(tl.int64) * L

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, L, BLOCK_M):
        m_mask = (m0 + offs_m) < L
        qm_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + (m0 + offs_m)[:, None] * sq_l + offs_d[None, :] * sq_d, mask=qm_mask, other=0.0)
        do = tl.load(do_base + (m0 + offs_m)[:, None] * sdo_l + offs_d[None, :] * sdo_d, mask=qm_mask, other=0.0)
        lse = tl.load(lse_ptr + row_base + m0 + offs_m, mask=m_mask, other=0.0) * _LOG2E
        delta = tl.load(delta_ptr + row_base + m0 + offs_m, mask=m_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # S^T, [BLOCK_N, BLOCK_M], log2 units
        p_t = tl.exp2(s_t - lse[None, :])
        p_t = tl.where(n_mask[:, None] & m_mask[None, :], p_t, 0.0)  # padded rows/keys contribute nothing
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # dP^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")
    dk = dk * sc
    tl.store(dk_ptr + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_l + offs_d[None, :] * sdk_d,
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_l + offs_d[None, :] * sdv_d,
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (B, H, L, D) queries
    k_ptr,  # (B, H, L, D) keys
    v_ptr,  # (B, H, L, D) values
    do_ptr,  # (B, H, L, D) upstream gradient
    lse_ptr,  # (B, H, L) fp32 contiguous logsumexp from the forward
    delta_ptr,  # (B, H, L) fp32 contiguous rowsum(dO * O)
    dq_ptr,  # (B, H, L, D) out: query gradient, q's dtype
    sq_b, sq_h, sq_l, sq_d,  # q strides
    sk_b, sk_h, sk_l, sk_d,  # k strides
    sv_b, sv_h, sv_l, sv_d,  # v strides
    sdo_b, sdo_h, sdo_l, sdo_d,  # do strides
    sdq_b, sdq_h, sdq_l, sdq_d,  # dq strides
    H,  # heads
    L,  # sequence length
    D,  # head dim, <= BLOCK_D
    scale,  # float softmax scale; may arrive as fp64 under Inductor
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < L
    d_mask = offs_d < D
    qm_mask = m_mask[:, None] & d_mask[None, :]
    sc = tl.cast(scale, tl.float32)
    qk_scale = sc * _LOG2E

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d, mask=qm_mask, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :] * sdo_d, mask=qm_mask,
                 other=0.0)
    row_base = pid_bh.to(tl.int64) * L
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        n_mask = (n0 + offs_n) < L
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + (n0 + offs_n)[:, None] * sk_l + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + (n0 + offs_n)[:, None] * sv_l + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    dq = dq * sc
    tl.store(dq_ptr + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_l + offs_d[None, :] * sdq_d,
             dq.to(dq_ptr.dtype.element_ty), mask=qm_mask)


# ------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class AttnConfig:
    """One launch configuration, used by all four kernels of a call.

    fwd / dq: BLOCK_M query rows per program, BLOCK_N keys per step; dkdv: BLOCK_N keys per
    program, BLOCK_M query rows per step; preprocess: BLOCK_M rows per program.
    """

    block_m: int  # BLOCK_M, power of 2, >= 16
    block_n: int  # BLOCK_N, power of 2, >= 16
    block_d: int  # BLOCK_D, next power of two >= D, in {16, 32, 64, 128, 256}
    num_warps: int
    num_stages: int
    dkdv_block_m: int | None = None  # the dkdv kernel's query rows per step, when not block_m

    @property
    def preprocess_warps(self) -> int:
        """Warps of the row-sum preprocess kernel: 16 elements of o and of do per thread (4 warps at
        D = 64, 8 at D = 128); at 32 per thread the fp16 tile spills registers."""
        return max(4, min(16, self.block_m * self.block_d // (32 * 16)))

    def launch(self, kind: str) -> tuple[dict, dict]:
        """(constexprs, options) the kernel ``kind`` is launched and compiled with."""
        if kind not in KERNEL_KINDS:
            raise ValueError(f"launch: kind must be one of {KERNEL_KINDS}, got {kind!r}")
        if kind == "bwd_preprocess":
            return ({"BLOCK_M": self.block_m, "BLOCK_D": self.block_d},
                    {"num_warps": self.preprocess_warps, "num_stages": self.num_stages})
        block_m = self.dkdv_block_m or self.block_m if kind == "bwd_dkdv" else self.block_m
        return ({"BLOCK_M": block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d},
                {"num_warps": self.num_warps, "num_stages": self.num_stages})


# Keyed by block_d. Sized so that fwd and bwd fit sm_80's 163 KiB of shared memory in fp32 too
# (the AOT compile test checks it), and so that the bf16/fp16 kernels at D = 32, 64, 128 spill no
# register on sm_80 or sm_90 with Triton 3.8 (ptxas -v: tests/kernels/test_kernel_resources.py).
# At D = 64 the dkdv kernel steps 32 query rows at a time: 64 rows need more than a thread's 255
# registers on sm_80. Triton 3.6 (the H200 machine's) still spills 48-64 bytes there on sm_80, not
# on sm_90 (the README's version matrix).
_MENU: dict[int, AttnConfig] = {
    16: AttnConfig(64, 64, 16, 4, 2),
    32: AttnConfig(64, 64, 32, 4, 2),
    64: AttnConfig(64, 64, 64, 4, 2, dkdv_block_m=32),
    128: AttnConfig(64, 32, 128, 8, 2),  # 8 warps: with 4, Triton 3.6 spills
    256: AttnConfig(32, 32, 256, 4, 1),
}
ALL_CONFIGS: tuple[AttnConfig, ...] = tuple(_MENU.values())  # every config pick_config can return

D_MIN, D_MAX = 16, 256


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def pick_config(L: int, D: int) -> AttnConfig:
    """The launch config for sequence length ``L`` and head dim ``D`` (only ``D`` matters today)."""
    if L < 1:
        raise ValueError(f"pick_config: L={L} must be >= 1")
    if not D_MIN <= D <= D_MAX:
        raise ValueError(f"pick_config: head dim D={D} must be in [{D_MIN}, {D_MAX}]")
    return _MENU[_block_d(D)]


# ------------------------------------------------------------------------------------ launchers
# Inputs are valid: jdm_fast.ops.attention checks them, once, with messages for users.
def _config(fn: str, config: AttnConfig | None, L: int, D: int) -> AttnConfig:
    if config is None:
        return pick_config(L, D)
    if not isinstance(config, AttnConfig):
        raise TypeError(f"{fn}: config must be an AttnConfig or None, got {type(config).__name__}")
    for name in ("block_m", "block_n", "block_d"):
        val = getattr(config, name)
        if val < 16 or val & (val - 1):
            raise ValueError(f"{fn}: config {name}={val} must be a power of two >= 16 (tl.dot)")
    if config.block_d < D:
        raise ValueError(f"{fn}: config block_d={config.block_d} is smaller than head dim D={D}")
    return config


# Every output buffer comes from this function, so tests can poison (NaN-fill) them.
def _empty(shape: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=dtype)


def token_major(q: torch.Tensor) -> bool:
    """Whether q (B, H, L, D) is laid out token-major (heads inside tokens, as views of a packed
    (B, L, 3, H, D) qkv from a channels-last feature map are): then the output is allocated
    (B, L, H, D) in memory, so merging its heads back into (B, L, C) channels is a view."""
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def attention_fwd(q, k, v, scale: float, config: AttnConfig | None = None):
    """Forward. Returns (o (B, H, L, D) in q's dtype, lse (B, H, L) fp32 natural log); o is
    contiguous, or (B, L, H, D) in memory when q is token-major (``token_major``).

    q, k, v: (B, H, L, D), one shape / dtype (fp32, fp16, bf16) / device, any strides; L >= 1,
    16 <= D <= 256, B * H within the grid's axis 1 (65,535). ``config`` forces a launch config (tests).
    """
    B, H, L, D = q.shape
    cfg = _config("attention_fwd", config, L, D)
    if token_major(q):
        o = _empty((B, L, H, D), q.device, q.dtype).transpose(1, 2)
    else:
        o = _empty((B, H, L, D), q.device, q.dtype)
    lse = _empty((B, H, L), q.device)
    if B * H == 0:
        return o, lse
    grid = (triton.cdiv(L, cfg.block_m), B * H)  # query blocks of one (b, h) run adjacent: K/V stay in L2
    const, options = cfg.launch("fwd")
    launcher(_attn_fwd_kernel)[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, L, D, scale, **const, **options,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale: float, config: AttnConfig | None = None):
    """Backward. Returns (dq, dk, dv), each (B, H, L, D) contiguous in q's dtype; deterministic.

    do, q, k, v, o: (B, H, L, D), one shape / dtype / device, any strides; lse: the forward's
    (B, H, L) fp32 (any strides: made contiguous if needed, a no-op for the forward's output).
    """
    B, H, L, D = q.shape
    lse = lse.contiguous()
    cfg = _config("attention_bwd", config, L, D)
    dq = _empty((B, H, L, D), q.device, q.dtype)
    dk = _empty((B, H, L, D), q.device, q.dtype)
    dv = _empty((B, H, L, D), q.device, q.dtype)
    if B * H == 0:
        return dq, dk, dv
    delta = _empty((B, H, L), q.device)
    const, options = cfg.launch("bwd_preprocess")
    launcher(_attn_bwd_preprocess_kernel)[(triton.cdiv(L, cfg.block_m), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, L, D, **const, **options,
    )
    const, options = cfg.launch("bwd_dkdv")
    launcher(_attn_bwd_dkdv_kernel)[(triton.cdiv(L, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, L, D, scale, **const, **options,
    )
    const, options = cfg.launch("bwd_dq")
    launcher(_attn_bwd_dq_kernel)[(triton.cdiv(L, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, L, D, scale, **const, **options,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------ AOT helpers
KERNELS = {"fwd": _attn_fwd_kernel, "bwd_preprocess": _attn_bwd_preprocess_kernel,
           "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel}
KERNEL_KINDS = tuple(KERNELS)
# The dtype of each pointer argument of the kernels, by name: the inputs' ("x") or a fixed dtype.
_POINTERS = {"q_ptr": "x", "k_ptr": "x", "v_ptr": "x", "o_ptr": "x", "do_ptr": "x", "dq_ptr": "x", "dk_ptr": "x",
             "dv_ptr": "x", "lse_ptr": "fp32", "delta_ptr": "fp32"}


def aot_compile_args(kernel_kind: str, cfg: AttnConfig, dtype, scale_dtype="fp32"):
    """(fn, signature, constexprs) for ``triton.compile(ASTSource(fn, signature, constexprs))``.

    kernel_kind: one of KERNEL_KINDS. dtype: the inputs' dtype ("fp32"/"fp16"/"bf16" or a torch
    dtype). scale_dtype: "fp64" is what Inductor passes. Compile with the options of
    ``cfg.launch(kernel_kind)[1]`` (num_warps, num_stages), as the launchers do.
    """
    if kernel_kind not in KERNELS:
        raise ValueError(f"aot_compile_args: kernel_kind must be one of {KERNEL_KINDS}, got {kernel_kind!r}")
    pointers = {name: dtype if source == "x" else source for name, source in _POINTERS.items()}
    fn = KERNELS[kernel_kind]
    sig, const = aot_signature(fn, pointers, cfg.launch(kernel_kind)[0], scalars={"scale": scale_dtype})
    return fn, sig, const
