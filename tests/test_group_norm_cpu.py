"""The C++ CPU kernels of group_norm_silu (csrc/norm_cpu.cpp), the default path on CPU tensors:
forward and every gradient against float64 PyTorch, within twice the error of plain PyTorch in
the same precision (floor per dtype); NCHW and channels-last; opcheck; deterministic gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from jdm_fast.ops import backend, group_norm_silu
from jdm_fast.ops._extension import HAS_C

pytestmark = pytest.mark.skipif(not HAS_C, reason="jdm_fast._C was not built")
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _plain(x, groups, w, b, s, sh, act):
    """What a user writes in PyTorch (in x's dtype, affine in its dtype): the error yardstick."""
    y = F.group_norm(x, groups, None if w is None else w.to(x.dtype), None if b is None else b.to(x.dtype), 1e-5)
    extra = (1,) * (x.dim() - 2)
    if s is not None:
        y = y * (1 + s.reshape(*s.shape, *extra))
    if sh is not None:
        y = y + sh.reshape(*sh.shape, *extra)
    return F.silu(y) if act else y


def _grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad if t is not None else None for t in leaves]


CASES = [  # shape, groups, dtype, film, affine, act, channels_last
    ((2, 32, 7, 9), 8, torch.float32, True, True, True, False),
    ((2, 32, 7, 9), 8, torch.float32, True, True, True, True),
    ((3, 64, 14, 14), 32, torch.bfloat16, True, True, True, True),  # the CIFAR block's 2 channels per group
    ((3, 12, 5, 5), 3, torch.bfloat16, False, True, False, False),
    ((2, 16, 10), 4, torch.float32, False, True, False, False),  # the attention block's (B, C, L) norm
    ((2, 16, 10), 4, torch.float16, True, False, True, False),  # affine=False, fp16
    ((4, 32, 1, 1), 16, torch.float32, True, True, True, False),  # two-element groups
    ((2, 24, 33, 3), 6, torch.float16, True, True, True, True),  # odd sizes: vector tails
]


@pytest.mark.parametrize("shape,groups,dtype,film,affine,act,cl", CASES)
def test_cpu_kernel_matches_float64(shape, groups, dtype, film, affine, act, cl):
    g = torch.Generator().manual_seed(0)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, generator=g) if affine else None
    b = torch.randn(c, generator=g) if affine else None
    s = 0.5 * torch.randn(n, c, generator=g) if film else None
    sh = torch.randn(n, c, generator=g) if film else None
    dy = torch.randn(shape, generator=g)
    low = [t.to(dtype) if t is not None and t.dim() != 1 else t for t in (x, w, b, s, sh)]

    def ours(*t):
        return group_norm_silu(t[0], groups, t[1], t[2], 1e-5, scale=t[3], shift=t[4],
                               activation="silu" if act else None)

    with backend("auto"):
        got = _grads(ours, low, dy.to(dtype))
    ref = _grads(lambda *t: _plain(t[0], groups, *t[1:], act), [t.double() if t is not None else None for t in low],
                 dy.to(dtype).double())
    plain = _grads(lambda *t: _plain(t[0], groups, *t[1:], act), low, dy.to(dtype))
    assert got[0].dtype == dtype and got[0].shape == x.shape
    if cl and x.shape[2] * x.shape[3] > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)

    def rel(a, r):
        return ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()

    for name, a, p, r in zip(("y", "dx", "dw", "db", "dscale", "dshift"), got, plain, ref):
        assert (a is None) == (r is None), name
        if a is None:
            continue
        assert torch.isfinite(a).all(), name
        bound = max(2 * rel(p, r), FLOOR[dtype])
        assert rel(a, r) <= bound, f"{name}: error {rel(a, r):.3g} > {bound:.3g} (plain torch {rel(p, r):.3g})"


def test_cpu_path_is_the_default_on_cpu_and_reference_forces_pytorch():
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 8, 4, 4)
    with Ops():
        group_norm_silu(x, 2)
    assert any("group_norm_silu_cpu" in f for f in seen)
    seen.clear()
    with backend("reference"), Ops():
        group_norm_silu(x, 2)
    assert not any("jdm_fast" in f for f in seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_a_non_finite_input_poisons_its_group_only(dtype, cl):
    """A NaN or inf in one group makes that group's outputs and input gradients NaN (rounded to NaN,
    not to a finite bf16/fp16 value) and leaves every other group's finite: a bad batch is never
    silently normalised into finite numbers."""
    x = torch.randn(3, 32, 5, 5).to(dtype)
    x[1, 9, 2, 3], x[2, 30, 0, 0] = float("nan"), float("inf")  # groups (1, 2) and (2, 7) of 8
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = group_norm_silu(x, 8, torch.randn(32), torch.randn(32))
    y.backward(torch.ones_like(y))
    bad = torch.zeros(3, 8, dtype=torch.bool)
    bad[1, 2] = bad[2, 7] = True
    for t in (y, x.grad):
        per_group = t.detach().float().reshape(3, 8, -1)
        assert torch.isnan(per_group[bad]).all()
        assert torch.isfinite(per_group[~bad]).all()


@pytest.mark.parametrize("cl", [False, True])
def test_silu_tails_saturate_without_subnormals(cl):
    """Far in the tails SiLU saturates exactly: y = 0 (and dy/dv = 0) for v <= -89, y = v (dy/dv = 1)
    for v >= 88, float64-accurate in between. The kernel's sigmoid reaches 0 through exp overflowing to
    inf, never through a subnormal constant: vectorised code computes both branches, and a subnormal
    operand costs a microcode assist per instruction on Intel cores (the whole forward ran 4-5x slower)."""
    v = torch.tensor([-300.0, -120.0, -89.5, -89.0, -87.0, -60.0, -20.0, -1e-3, 0.0, 1e-4, 0.7, 5.0, 30.0, 88.0,
                      100.0, 1e4])
    c = v.numel()
    x = torch.randn(2, c, 4, 8)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    b = v.clone().requires_grad_()  # weight 0: every pixel of channel c is exactly v[c]
    y = group_norm_silu(x, 4, torch.zeros(c), b)
    y.backward(torch.ones_like(y))
    v64 = v.double()
    ref_y = v64 * torch.sigmoid(v64)
    ref_d = torch.sigmoid(v64) * (1 + v64 * (1 - torch.sigmoid(v64))) * 2 * 4 * 8  # db sums dy * silu'(v)
    got = y.detach()[0, :, 0, 0].double()
    assert torch.allclose(got, ref_y, rtol=2e-6, atol=1e-30), (got, ref_y)
    tails = v <= -89
    assert (got[tails] == 0).all() and (b.grad[tails] == 0).all()
    assert (got[v >= 88] == v64[v >= 88]).all() and (b.grad[v >= 88] == 64).all()
    assert torch.allclose(b.grad.double(), ref_d, rtol=1e-5, atol=1e-30), (b.grad, ref_d)


def test_cpu_kernel_gradients_are_deterministic():
    x = torch.randn(8, 32, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    dy = torch.randn(8, 32, 9, 9)
    runs = []
    for _ in range(2):
        for t in (x, w, b):
            t.grad = None
        group_norm_silu(x, 8, w, b).backward(dy)
        runs.append([t.grad.clone() for t in (x, w, b)])
    assert all(torch.equal(a, c) for a, c in zip(*runs))


@pytest.mark.parametrize("cl", [False, True])
def test_opcheck(cl):
    x = torch.randn(2, 8, 3, 5)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, s = torch.randn(8), torch.randn(8), torch.randn(2, 8)
    torch.library.opcheck(torch.ops.jdm_fast.group_norm_silu_cpu, (x.requires_grad_(), w, b, s, s, 4, 1e-5, True))
    y, mean, rstd = torch.ops.jdm_fast.group_norm_silu_cpu(x.detach(), w, b, s, s, 4, 1e-5, True)
    torch.library.opcheck(torch.ops.jdm_fast.group_norm_silu_cpu_backward,
                          (torch.randn_like(y), x.detach(), w, b, s, s, mean, rstd, 4, True))


def test_bad_input_names_the_argument():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        torch.ops.jdm_fast.group_norm_silu_cpu(x, None, None, None, None, 3, 1e-5, True)
    with pytest.raises(ValueError, match="weight must have 8 elements"):
        torch.ops.jdm_fast.group_norm_silu_cpu(x, torch.ones(7), None, None, None, 2, 1e-5, True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.jdm_fast.group_norm_silu_cpu(x.double(), None, None, None, None, 2, 1e-5, True)
