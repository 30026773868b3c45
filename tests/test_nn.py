"""jdm_fast.ops / jdm_fast.nn reference paths against float64 PyTorch math."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jdm_fast.nn import GroupNormSiLU, SelfAttention2d
from jdm_fast.ops import attention, group_norm_silu


def _gn_ref(x, groups, w, b, eps, scale=None, shift=None, act=True):
    x = x.double()
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = g.var(-1, unbiased=False, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape_as(x)
    extra = (1,) * (x.dim() - 2)
    y = y * w.double().reshape(1, c, *extra) + b.double().reshape(1, c, *extra)
    if scale is not None:
        y = y * (1 + scale.double().reshape(n, c, *extra))
    if shift is not None:
        y = y + shift.double().reshape(n, c, *extra)
    return y * torch.sigmoid(y) if act else y


@pytest.mark.parametrize("shape,groups", [
    ((2, 32, 7, 7), 8),  # odd spatial
    ((1, 6, 1, 1), 3),  # 1x1 map
    ((3, 64, 28, 28), 32),  # ADM default groups
    ((2, 5, 4, 4), 5),  # one channel per group
])
@pytest.mark.parametrize("film", [False, True])
def test_group_norm_silu_matches_float64(shape, groups, film):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    scale = torch.randn(shape[:2], generator=g) if film else None
    shift = torch.randn(shape[:2], generator=g) if film else None
    out = group_norm_silu(x, groups, w, b, 1e-5, scale=scale, shift=shift)
    ref = _gn_ref(x, groups, w, b, 1e-5, scale, shift)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5
    plain = group_norm_silu(x, groups, w, b, 1e-5, activation=None)
    assert torch.allclose(plain.double(), _gn_ref(x, groups, w, b, 1e-5, act=False), atol=1e-5)


def test_group_norm_silu_low_precision_keeps_dtype():
    x = torch.randn(2, 8, 5, 5)
    w, b = torch.ones(8), torch.zeros(8)
    out = group_norm_silu(x.bfloat16(), 4, w, b)
    assert out.dtype == torch.bfloat16
    assert (out.double() - _gn_ref(x.bfloat16(), 4, w, b, 1e-5)).abs().max() < 2e-2


def test_group_norm_silu_bad_inputs():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        group_norm_silu(x, 4)
    with pytest.raises(TypeError, match="floating"):
        group_norm_silu(x.long(), 3)
    with pytest.raises(ValueError, match="scale must have shape"):
        group_norm_silu(x, 3, scale=torch.randn(2, 5))
    with pytest.raises(ValueError, match="activation"):
        group_norm_silu(x, 3, activation="relu")


def test_groupnormsilu_is_a_dropin_for_nn_groupnorm():
    ref = nn.GroupNorm(4, 16)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = GroupNormSiLU.from_module(ref)
    assert isinstance(ours, nn.GroupNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 16, 6, 6)
    torch.testing.assert_close(ours(x), F.silu(ref(x)))
    plain = GroupNormSiLU(4, 16, activation=None)
    plain.load_state_dict(ref.state_dict())
    torch.testing.assert_close(plain(x), ref(x))
    back = nn.GroupNorm(4, 16)  # and back: our checkpoints load into stock modules
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(F.silu(back(x)), ours(x))
    with pytest.raises(ValueError, match="divisible"):
        GroupNormSiLU(5, 16)


def _attn_ref(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("b,h,l,d", [(2, 4, 49, 16), (1, 1, 1, 40), (2, 2, 100, 64)])
def test_attention_matches_float64(b, h, l, d):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, l, d, generator=g) for _ in range(3))
    out = attention(q, k, v)
    ref = _attn_ref(q, k, v, d ** -0.5)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5
    out2 = attention(q, k, v, scale=0.3)
    assert (out2.double() - _attn_ref(q, k, v, 0.3)).abs().max() < 1e-5


def test_attention_bad_inputs():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="equal shapes"):
        attention(q, q, torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="floating"):
        attention(q.long(), q.long(), q.long())


def test_self_attention_block_matches_float64():
    torch.manual_seed(0)
    blk = SelfAttention2d(32, num_head_channels=8, num_groups=8)
    nn.init.normal_(blk.proj_out.weight, std=0.1)  # zero-initialised: make the branch visible
    x = torch.randn(2, 32, 5, 5)
    out = blk(x)
    # independent reference: float64, heads split from a freshly reshaped qkv
    xs = x.double().reshape(2, 32, 25)
    hn = _gn_ref(xs, 8, blk.norm.weight, blk.norm.bias, blk.norm.eps, act=False)
    qkv = torch.einsum("oc,bcl->bol", blk.qkv.weight.double()[..., 0], hn) + blk.qkv.bias.double()[:, None]
    q, k, v = qkv.reshape(2, 3, 4, 8, 25).unbind(1)
    a = torch.softmax(torch.einsum("bhdl,bhdm->bhlm", q, k) / 8 ** 0.5, -1)
    o = torch.einsum("bhlm,bhdm->bhdl", a, v).reshape(2, 32, 25)
    ref = xs + torch.einsum("oc,bcl->bol", blk.proj_out.weight.double()[..., 0], o) + blk.proj_out.bias.double()[:, None]
    assert (out.double().reshape(2, 32, 25) - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="exactly one"):
        SelfAttention2d(32)
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention2d(32, num_heads=5)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_keeping_split_cat_and_mean_compute_what_torch_computes(layout, dtype):
    """split_batch / cat_channels / spatial_mean: the values and gradients of x[:b], x[b:],
    torch.cat(dim=1) and x.float().mean((2, 3)) (float64 reference of the same inputs), each input's
    gradient dense in the input's layout and dtype (an unused half's gradient is zeros)."""
    from jdm_fast.nn.layout import cat_channels, spatial_mean, split_batch
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(5, c, 4, 3, generator=g) for c in (6, 2)]
    w_cat, w_mean = torch.randn(3, 8, 4, 3, generator=g), torch.randn(2, 6, generator=g)

    def run(dt, ours):
        a, b = (t.to(dt, copy=True).contiguous(memory_format=layout).requires_grad_() for t in base)
        top, rest = split_batch(a, 3) if ours else (a[:3], a[3:])
        cat = cat_channels(top, b[:3]) if ours else torch.cat([top, b[:3]], dim=1)
        mean = spatial_mean(rest) if ours else rest.double().mean(dim=(2, 3))
        loss = (cat.double() * w_cat).sum() + (mean.double() * w_mean).sum()
        loss.backward()
        return cat, mean, a.grad, b.grad

    ours, ref = run(dtype, True), run(torch.float64, False)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r.double(), rtol=tol, atol=tol)
    assert ours[1].dtype == torch.float32
    for grad in ours[2:]:
        assert grad.dtype == dtype and grad.is_contiguous(memory_format=layout)
    assert torch.equal(ours[3][3:], torch.zeros_like(ours[3][3:]))
    x = base[0].to(dtype, copy=True).contiguous(memory_format=layout).requires_grad_()
    split_batch(x, 2)[0].sum().backward()  # the rest is unused: its gradient is zeros
    assert x.grad.is_contiguous(memory_format=layout)
    assert torch.equal(x.grad, torch.cat([torch.ones_like(x[:2]), torch.zeros_like(x[2:])]))
    with pytest.raises(ValueError, match="b=6 outside 0..5"):
        split_batch(base[0], 6)
    with pytest.raises(ValueError, match=r"spatial_mean: x must be \(N, C, H, W\)"):
        spatial_mean(base[0][0])
