"""The attention op: Triton path (interpreter on CPU) through the registered custom op and its
autograd against the SDPA reference; opcheck; torch.compile; the diffusers processor."""
import importlib
import os

import pytest
import torch
from torch import nn

from jdm_fast.nn import SelfAttention2d
from jdm_fast.ops import attention, backend

HAS_TRITON_DEVICE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
attention_mod = importlib.import_module("jdm_fast.ops.attention")  # the package exports a function of that name
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")  # see test_group_norm_op.py


def _qkv(b, h, length, d, dtype=torch.float32, packed=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if packed:  # ADM's layout: (B, 3, heads, D, L), q/k/v are transposed strided views
        qkv = torch.randn(b, 3, h, d, length, generator=g).to(DEVICE, dtype).requires_grad_()
        return qkv, [qkv[:, i].transpose(-1, -2) for i in range(3)]
    leaves = [torch.randn(b, h, length, d, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]
    return leaves, leaves


def _grads(name, b, h, length, d, dtype, packed):
    leaves, (q, k, v) = _qkv(b, h, length, d, dtype, packed)
    dy = torch.randn(b, h, length, d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with backend(name):
        out = attention(q, k, v)
    out.backward(dy)
    grads = [leaves.grad] if packed else [t.grad for t in leaves]
    return out, grads


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@needs_triton
@pytest.mark.parametrize("b,h,length,d,dtype,packed", [
    (2, 2, 49, 40, torch.float32, True),  # 7x7 map, D not a power of two, packed qkv views
    (1, 3, 7, 64, torch.bfloat16, False),
    (2, 1, 1, 16, torch.float16, True),  # a 1x1 map
])
def test_triton_op_matches_reference(b, h, length, d, dtype, packed):
    out_t, g_t = _grads("triton", b, h, length, d, dtype, packed)
    out_r, g_r = _grads("reference", b, h, length, d, dtype, packed)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert out_t.shape == (b, h, length, d) and out_t.dtype == dtype
    assert _rel(out_t, out_r) <= tol
    for a, r in zip(g_t, g_r):
        assert _rel(a, r) <= 4 * tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_path_matches_float64(dtype, tol):
    """The default CPU path (matmuls around a softmax in the input dtype) on the channels-last
    block's token-major qkv views: output and gradients against float64 softmax(q k^T / sqrt(D)) v."""
    b, h, length, d = 2, 3, 49, 32
    g = torch.Generator().manual_seed(0)
    base = torch.randn(b, length, 3, h, d, generator=g)
    dy = torch.randn(b, h, length, d, generator=g)
    outs, grads = {}, {}
    for name, dt in (("ours", dtype), ("ref", torch.float64)):
        qkv = base.to(dt, copy=True).requires_grad_()
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) strided views
        if name == "ours":  # what attention() runs on CPU tensors without Triton
            out = attention_mod._cpu_attention(q, k, v, d ** -0.5)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1) @ v
        out.backward(dy.to(dt))
        outs[name], grads[name] = out, qkv.grad
    assert outs["ours"].dtype == dtype
    assert _rel(outs["ours"], outs["ref"]) <= tol
    assert _rel(grads["ours"], grads["ref"]) <= 2 * tol


@pytest.mark.inductor  # benchmarks/gpu_check runs these on the GPU first (-m inductor)
@needs_triton
def test_opcheck_and_fullgraph_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    _, (q, k, v) = _qkv(2, 2, 10, 16, packed=False)
    torch.library.opcheck(torch.ops.jdm_fast.attention_fwd.default, (q, k, v, 0.25),
                          test_utils="ALL" if torch.cuda.is_available() else CPU_OPCHECK)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor" if torch.cuda.is_available() else "eager")

    @torch.compile(fullgraph=True, backend=counter)
    def f(qkv):
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
        return attention(q, k, v).square().sum()

    with backend("triton"):
        for seed in (0, 1):
            qkv, _ = _qkv(2, 2, 10, 16, seed=seed)
            f(qkv).backward()
            assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    assert counter.frame_count == 1


@needs_triton
def test_self_attention_block_same_with_either_backend():
    torch.manual_seed(0)
    blk = SelfAttention2d(32, num_head_channels=16, num_groups=8).to(DEVICE)
    nn.init.normal_(blk.proj_out.weight, std=0.1)
    x = torch.randn(2, 32, 5, 5, device=DEVICE)
    outs = {}
    for name in ("triton", "reference"):
        blk.zero_grad()
        with backend(name):
            y = blk(x)
        y.square().sum().backward()
        outs[name] = (y.detach(), blk.qkv.weight.grad.clone())
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["triton"][1], outs["reference"][1], rtol=1e-4, atol=1e-5)


@needs_triton
def test_diffusers_processor_matches_diffusers_default():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from jdm_fast.integrations.diffusers import FusedAttnProcessor, use_fused_attention

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(32, 32), norm_num_groups=8, attention_head_dim=16,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(DEVICE)
    x, t = torch.randn(2, 1, 8, 8, device=DEVICE), torch.tensor([10, 500], device=DEVICE)
    results = {}
    attn_layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert len(attn_layers) == 4  # 1 down, 1 mid, 2 up (layers_per_block + 1)
    for name in ("ours", "diffusers"):
        if name == "ours":
            assert use_fused_attention(unet) == 4
        else:
            for layer in attn_layers:
                layer.set_processor(AttnProcessor2_0())
        assert all(isinstance(layer.processor, FusedAttnProcessor) == (name == "ours") for layer in attn_layers)
        unet.zero_grad()
        with backend("triton"):
            out = unet(x, t).sample
        out.square().mean().backward()
        results[name] = (out.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None])
    torch.testing.assert_close(results["ours"][0], results["diffusers"][0], rtol=1e-4, atol=1e-5)
    assert len(results["ours"][1]) == len(results["diffusers"][1])
    for a, b in zip(results["ours"][1], results["diffusers"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="cross-attention"):
        FusedAttnProcessor()(unet.mid_block.attentions[0], torch.randn(1, 4, 32, device=DEVICE),
                             encoder_hidden_states=torch.randn(1, 3, 32, device=DEVICE))


def test_small_head_dims_run_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(attention_mod, "_warned_small_d", False)
    monkeypatch.setattr(attention_mod, "use_triton", lambda device, op: True)
    _, (q, k, v) = _qkv(1, 2, 5, 8, packed=False)
    with pytest.warns(UserWarning, match="head dim 8 < 16 runs the PyTorch reference"):
        out = attention(q, k, v)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5, -1) @ v.double()
    assert (out.double() - ref).abs().max() < 1e-5


def test_bad_inputs():
    q = torch.randn(1, 2, 4, 300)
    with pytest.raises(ValueError, match="D=300 exceeds"):
        attention(q, q, q)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="different devices"):
        attention(q, q, q.to("meta"))
    with pytest.raises(TypeError, match="floating"):
        attention(q.int(), q.int(), q.int())


# The kernels' launchers trust their inputs: the op checks them, for every backend or where it
# chooses the Triton kernels, and the message names the argument.
@pytest.mark.parametrize("case,triton_only,exc,match", [
    ("q3d", False, ValueError, r"q must be \(B, H, L, D\)"),
    ("k_shape", False, ValueError, "q, k, v must have equal shapes"),
    ("v_dtype", False, TypeError, "share a dtype"),
    ("v_device", False, ValueError, "different devices"),
    ("d_large", False, ValueError, "D=320 exceeds"),
    ("scale_type", False, TypeError, "scale must be a float or None, got str"),
    ("scale_bool", False, TypeError, "scale must be a float or None, got bool"),
    ("float64", True, TypeError, "q, k, v must be float32/float16/bfloat16 for the Triton kernels"),
    ("grid_y", True, ValueError, r"B \* H = 65536 exceeds 65535"),
])
def test_bad_inputs_are_caught_at_the_op(case, triton_only, exc, match):
    if triton_only and not HAS_TRITON_DEVICE:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py)")
    q, k, v = (torch.randn(2, 2, 8, 32, device=DEVICE) for _ in range(3))
    args = dict(q=q, k=k, v=v, scale=0.1)
    if case == "q3d":
        args["q"] = q[0]
    elif case == "k_shape":
        args["k"] = k[:, :, :4]
    elif case == "v_dtype":
        args["v"] = v.half()
    elif case == "v_device":
        args["v"] = torch.empty(v.shape, device="meta")
    elif case == "d_large":
        args.update(zip("qkv", (torch.randn(2, 2, 8, 320, device=DEVICE) for _ in range(3))))
    elif case == "scale_type":
        args["scale"] = "0.1"
    elif case == "scale_bool":
        args["scale"] = True
    elif case == "float64":
        args.update(q=q.double(), k=k.double(), v=v.double())
    elif case == "grid_y":
        args.update(zip("qkv", (torch.zeros(65536, 1, 1, 16, device=DEVICE) for _ in range(3))))
    with backend("triton" if triton_only else "reference"), pytest.raises(exc, match=match):
        attention(**args)


@needs_triton
def test_empty_sequences_and_numpy_scales_run():
    """L = 0 never reaches the kernels (nothing to launch); any real number is a scale."""
    np = pytest.importorskip("numpy")
    q = torch.randn(2, 2, 0, 16, device=DEVICE)
    with backend("triton"):
        assert attention(q, q, q).shape == (2, 2, 0, 16)
        _, (q, k, v) = _qkv(1, 2, 5, 16, packed=False)
        out = attention(q, k, v, scale=np.float32(0.25))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.25, -1) @ v.double()
    assert (out.double() - ref).abs().max() < 1e-5
