"""The group_norm_silu op: Triton path (interpreter on CPU) through the registered custom op and
its autograd against the PyTorch reference; opcheck; torch.compile; backend switch; bad input."""
import os

import pytest
import torch
from torch import nn

import jdm_fast.ops.backends as backend_mod
from jdm_fast.models.config import UNetConfig
from jdm_fast.models.unet import UNet
from jdm_fast.ops import backend, current_backend, group_norm_silu

HAS_TRITON_DEVICE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, groups, dtype=torch.float32, film=True, affine=True, layout=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=layout)
    w = torch.randn(c, generator=g).to(DEVICE) if affine else None
    b = torch.randn(c, generator=g).to(DEVICE) if affine else None
    s = torch.randn(n, c, generator=g).to(DEVICE, dtype) * 0.5 if film else None
    sh = torch.randn(n, c, generator=g).to(DEVICE, dtype) if film else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b, s, sh)]


def _run(name, inputs, groups, activation, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    with backend(name):
        y = group_norm_silu(leaves[0], groups, leaves[1], leaves[2], 1e-5, scale=leaves[3], shift=leaves[4],
                            activation=activation)
    y.backward(dy)
    return y, [t.grad if t is not None else None for t in leaves]


CASES = [  # shape, groups, dtype, film, affine, activation, layout
    ((2, 32, 7, 7), 8, torch.float32, True, True, "silu", torch.contiguous_format),
    ((2, 16, 5, 5), 4, torch.float32, False, True, None, torch.channels_last),
    ((3, 12, 4, 4), 3, torch.bfloat16, True, True, "silu", torch.channels_last),
    ((2, 16, 10), 4, torch.float32, False, True, None, None),  # the attention block's (B, C, L) norm
    ((1, 8, 3, 3), 2, torch.float16, True, False, "silu", torch.contiguous_format),  # affine=False
]


@needs_triton
@pytest.mark.parametrize("shape,groups,dtype,film,affine,activation,layout", CASES)
def test_triton_op_matches_reference_forward_and_gradients(shape, groups, dtype, film, affine, activation, layout):
    inputs = _inputs(shape, groups, dtype, film, affine, layout or torch.contiguous_format)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y_t, g_t = _run("triton", inputs, groups, activation, dy)
    y_r, g_r = _run("reference", inputs, groups, activation, dy)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()

    assert y_t.dtype == dtype and y_t.shape == y_r.shape
    if layout is torch.channels_last:
        assert y_t.is_contiguous(memory_format=torch.channels_last)
    assert rel(y_t, y_r) <= tol
    for name, a, b in zip(("x", "weight", "bias", "scale", "shift"), g_t, g_r):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert rel(a, b) <= 10 * tol, (name, rel(a, b))


# Under TRITON_INTERPRET, torch's wrap_triton returns the interpreted kernel itself, so tracing the
# triton_op's body with fake tensors (AOTAutograd, Inductor) cannot run on CPU: those checks run on
# a GPU (benchmarks/gpu_check); the CPU run covers schema, autograd registration, fake tensors and
# Dynamo's full-graph capture.
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@needs_triton
def test_opcheck_of_the_registered_op():
    utils = "ALL" if torch.cuda.is_available() else CPU_OPCHECK
    x, w, b, s, sh = _inputs((2, 8, 5, 5), 4)
    torch.library.opcheck(torch.ops.jdm_fast.group_norm_silu_fwd.default, (x, w, b, s, sh, 4, 1e-5, 1),
                          test_utils=utils)
    x, w, b, _, _ = _inputs((2, 8, 3, 3), 2, film=False)
    torch.library.opcheck(torch.ops.jdm_fast.group_norm_silu_fwd.default, (x, w, b, None, None, 2, 1e-5, 0),
                          test_utils=utils)


@pytest.mark.inductor  # benchmarks/gpu_check runs these on the GPU first (-m inductor)
@needs_triton
def test_compile_fullgraph_one_frame_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor" if torch.cuda.is_available() else "eager")

    @torch.compile(fullgraph=True, backend=counter)
    def f(x, w, b, s, sh):
        return group_norm_silu(x, 4, w, b, scale=s, shift=sh).square().sum()

    with backend("triton"):
        for seed in (0, 1):
            inputs = _inputs((2, 8, 6, 6), 4, seed=seed)
            f(*inputs).backward()
            assert inputs[0].grad is not None and inputs[3].grad is not None
    assert counter.frame_count == 1


@needs_triton
def test_unet_uses_the_fused_op_with_the_same_results():
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), num_heads=2, dropout=0.0, num_groups=4)
    unet = UNet(cfg).to(DEVICE)
    for p in unet.parameters():
        nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 1, 8, 8, device=DEVICE), torch.tensor([3, 70], device=DEVICE)
    grads = {}
    for name in ("triton", "reference"):
        unet.zero_grad()
        with backend(name):
            unet(x, t).square().mean().backward()
        grads[name] = [p.grad.clone() for p in unet.parameters()]
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backend_switch(monkeypatch):
    """JDM_FAST_BACKEND / TRITON_INTERPRET as read at import (backends.SETTINGS), and backend(...)."""
    settings = backend_mod.Settings.from_environment
    monkeypatch.setattr(backend_mod, "SETTINGS", settings({}))
    assert current_backend() == "auto"
    assert not backend_mod.use_triton(torch.device("cpu"), "op")  # auto: reference on CPU
    monkeypatch.setattr(backend_mod, "SETTINGS", settings({"JDM_FAST_BACKEND": "reference"}))
    assert current_backend() == "reference"
    with backend("triton"):
        assert current_backend() == "triton"  # the context manager wins over the variable
    with pytest.raises(ValueError, match="JDM_FAST_BACKEND must be one of"):
        settings({"JDM_FAST_BACKEND": "cuda-magic"})
    with pytest.raises(ValueError, match="backend must be one of"):
        with backend("fast"):
            pass
    monkeypatch.setattr(backend_mod, "SETTINGS", settings({"JDM_FAST_BACKEND": "triton"}))  # no TRITON_INTERPRET
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_mod.use_triton(torch.device("cpu"), "group_norm_silu")


def test_reference_backend_never_calls_the_kernels(monkeypatch):
    import jdm_fast.kernels.group_norm as kernels

    def boom(*a, **k):
        raise AssertionError("kernel launched under the reference backend")

    monkeypatch.setattr(kernels, "group_norm_fwd", boom)
    x, w, b, s, sh = _inputs((2, 8, 4, 4), 4)
    with backend("reference"):
        group_norm_silu(x, 4, w, b, scale=s, shift=sh)


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        group_norm_silu(x, 4)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        group_norm_silu(x.long(), 3)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 6\)"):
        group_norm_silu(x, 3, scale=torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        group_norm_silu(x, 3, weight=torch.randn(5))
    with pytest.raises(ValueError, match="shift is on meta"):
        group_norm_silu(x, 3, shift=torch.randn(2, 6, device="meta"))
    with pytest.raises(TypeError, match="bias must be a floating tensor"):
        group_norm_silu(x, 3, bias=torch.ones(6, dtype=torch.long))


# The kernels' launchers trust their inputs: the op checks them, for every backend or where it
# chooses the Triton kernels, and the message names the argument.
@pytest.mark.parametrize("case,triton_only,exc,match", [
    ("x1d", False, ValueError, r"x must be \(N, C, ...\)"),
    ("groups0", False, ValueError, "num_groups must be a positive int, got 0"),
    ("groups_bool", False, ValueError, "num_groups must be a positive int, got True"),
    ("shift_shape", False, ValueError, r"shift must have shape \(2, 8\)"),
    ("eps", False, ValueError, "eps must be a finite number > 0"),
    ("x_float64", True, TypeError, "x must be float32/float16/bfloat16"),
    ("bias_float64", True, TypeError, "bias must be float32/float16/bfloat16"),
    ("scale_float64", True, TypeError, "scale must be float32/float16/bfloat16"),
])
def test_bad_inputs_are_caught_at_the_op(case, triton_only, exc, match):
    if triton_only and not HAS_TRITON_DEVICE:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py)")
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    args = dict(x=x, num_groups=4, weight=torch.ones(8, device=DEVICE), bias=torch.zeros(8, device=DEVICE), eps=1e-5)
    if case == "x1d":
        args["x"] = torch.randn(8, device=DEVICE)
    elif case == "groups0":
        args["num_groups"] = 0
    elif case == "groups_bool":
        args["num_groups"] = True
    elif case == "shift_shape":
        args["shift"] = torch.zeros(2, 8, 2, device=DEVICE)
    elif case == "eps":
        args["eps"] = float("nan")
    elif case == "x_float64":
        args.update(x=x.double(), weight=None, bias=None)
    elif case == "bias_float64":
        args["bias"] = args["bias"].double()
    elif case == "scale_float64":
        args["scale"] = torch.zeros(2, 8, device=DEVICE, dtype=torch.float64)
    with backend("triton" if triton_only else "reference"), pytest.raises(exc, match=match):
        group_norm_silu(**args)


@needs_triton
def test_layouts_the_kernels_do_not_take_are_prepared_by_the_op():
    """Strides the kernels cannot read (H and W that do not flatten to one stride, a strided
    weight view) are copied by the op, never passed on: same values as the reference."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 3, generator=g).to(DEVICE).transpose(2, 3)  # (2, 8, 3, 5), stride(2) = 1
    w = torch.randn(16, generator=g).to(DEVICE)[::2]  # a view of stride 2
    b = torch.randn(8, generator=g).to(DEVICE)
    s = torch.randn(2, 8, generator=g).to(DEVICE) * 0.5
    ys = {}
    for name in ("triton", "reference"):
        with backend(name):
            ys[name] = group_norm_silu(x, 4, w, b, scale=s)
    torch.testing.assert_close(ys["triton"], ys["reference"], rtol=1e-5, atol=1e-5)


@needs_triton
def test_backward_with_an_upstream_gradient_of_another_layout():
    """The op gives dy x's layout before the backward kernel (which needs H, W flattened)."""
    inputs = _inputs((2, 8, 5, 5), 4, layout=torch.channels_last)
    dy = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE).transpose(2, 3)
    _, g_t = _run("triton", inputs, 4, "silu", dy)
    _, g_r = _run("reference", inputs, 4, "silu", dy)
    for name, a, b in zip(("x", "weight", "bias", "scale", "shift"), g_t, g_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@needs_triton
def test_transposed_sequence_input_runs_in_place():
    """(B, L, C).transpose(1, 2), as diffusers' attention hands its GroupNorm: viewed as (B, C, L, 1)
    with a channel stride of 1, which the kernels read without a copy (W = 1: pixel step = stride(2))."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 10, 16, generator=g).to(DEVICE)
    w, b = torch.randn(16, generator=g).to(DEVICE), torch.randn(16, generator=g).to(DEVICE)
    x = base.transpose(1, 2)
    with backend("triton"):
        y = group_norm_silu(x, 4, w, b, activation=None)
    with backend("reference"):
        ref = group_norm_silu(x, 4, w, b, activation=None)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
