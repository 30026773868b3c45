"""Every custom op's fake kernel describes what its real kernel returns: shapes, dtypes and strides.

torch.compile plans with the fake kernels (Inductor allocates buffers and picks layouts from them),
while the real kernels write the memory: a stride the fake gets wrong is a wrong result or a
crash that shows only on the device. Each op runs for real on the CPU (the C++ kernels, and the
Triton kernels under Triton's interpreter, as the test suite runs them) and under FakeTensorMode on
the same inputs, in NCHW and channels-last, with the token-major views the attention block passes,
forward and backward (the backward ops directly, and the gradients of the differentiable ops
through their registered autograd); every output must agree in shape, dtype and stride. The CUDA
noise kernels share their schema and fake with the CPU ones and return contiguous tensors as the
CPU ones do (csrc/noise_cuda_ops.cpp).
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import jdm_fast.ops  # noqa: F401 - registers the ops
from jdm_fast.ops.noise import HAS_C

CL = torch.channels_last
NO_TENSORS = {"cpu_kernel_isa"}  # returns a string: nothing to lay out


def _layout(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(o.shape), o.dtype, o.stride()) if isinstance(o, torch.Tensor) else o for o in outs]


def _fake_run(fn, *args):
    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return fn(*fake)


def _check(fn, *args, grads_of=()):
    """fn(*args) for real and under FakeTensorMode: same layouts; then, for the argument indices in
    ``grads_of`` (made to require grad), the gradients of sum(out * w) through autograd."""
    real = fn(*args)
    assert _layout(real) == _layout(_fake_run(fn, *args)), fn
    if not grads_of:
        return real

    def grad_fn(*a):
        a = [t.detach().requires_grad_() if i in grads_of else t for i, t in enumerate(a)]
        out = fn(*a)
        out = out[0] if isinstance(out, (tuple, list)) else out
        w = torch.ones_like(out)  # any cotangent: layouts only
        return torch.autograd.grad(out, [a[i] for i in grads_of], w)

    assert _layout(grad_fn(*args)) == _layout(_fake_run(grad_fn, *args)), f"gradients of {fn}"
    return real


def _gn_inputs(layout, dtype, film):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 5, 6, generator=g).to(dtype).contiguous(memory_format=layout)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    scale, shift = (torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)) if film else (None, None)
    return x, w, b, scale, shift


# The ops each test below runs (the last test checks that this covers every registered op).
COVERED = {"group_norm_silu_fwd", "group_norm_silu_bwd", "group_norm_silu_cpu", "group_norm_silu_cpu_backward",
           "attention_fwd", "attention_bwd", "q_sample", "q_sample_philox", "q_sample_keyed", "counter_timesteps",
           "counter_uniform", "eps_mse", "eps_mse_backward", "ancestral_step", "ddim_step"}


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("film", [False, True], ids=["affine", "film"])
def test_group_norm_fakes_match_the_kernels(layout, dtype, film):
    x, w, b, scale, shift = _gn_inputs(layout, dtype, film)
    fwd, bwd = torch.ops.jdm_fast.group_norm_silu_fwd, torch.ops.jdm_fast.group_norm_silu_bwd
    y, mean, rstd = _check(fwd, x, w, b, scale, shift, 8, 1e-5, 1, grads_of=(0, 1, 2) + ((3, 4) if film else ()))
    assert y.stride() == x.stride()  # the layout comes back as it came in
    _check(bwd, torch.randn_like(y), x, w, b, scale, shift, mean, rstd, 8, 1)
    if HAS_C:
        cpu, cpu_bwd = torch.ops.jdm_fast.group_norm_silu_cpu, torch.ops.jdm_fast.group_norm_silu_cpu_backward
        y, mean, rstd = _check(cpu, x, w, b, scale, shift, 8, 1e-5, True,
                               grads_of=(0, 1, 2) + ((3, 4) if film else ()))
        _check(cpu_bwd, torch.randn_like(y), x, w, b, scale, shift, mean, rstd, 8, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("views", ["contiguous", "token_major"])
def test_attention_fakes_match_the_kernels(dtype, views):
    """Token-major views are what the channels-last attention block passes: q, k, v slices of one
    (B, L, 3, H, D) tensor; the forward then returns a token-major output."""
    g = torch.Generator().manual_seed(0)
    b, h, length, d = 2, 2, 20, 16
    if views == "contiguous":
        q, k, v = (torch.randn(b, h, length, d, generator=g).to(dtype) for _ in range(3))
    else:
        q, k, v = torch.randn(b, length, 3, h, d, generator=g).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    fwd, bwd = torch.ops.jdm_fast.attention_fwd, torch.ops.jdm_fast.attention_bwd
    o, lse = _check(fwd, q, k, v, d ** -0.5, grads_of=(0, 1, 2))
    _check(bwd, torch.randn_like(o), q, k, v, o, lse, d ** -0.5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_op_fakes_match_the_kernels(layout, dtype):
    ops = torch.ops.jdm_fast
    g = torch.Generator().manual_seed(0)
    n, steps = 3, 10
    x0 = torch.randn(n, 4, 5, 6, generator=g).to(dtype).contiguous(memory_format=layout)
    noise = torch.randn(n, 4, 5, 6, generator=g).to(dtype).contiguous(memory_format=layout)
    t = torch.tensor([0, 4, 9])
    abar = torch.linspace(0.99, 0.01, steps, dtype=torch.float64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    first = torch.tensor(5, dtype=torch.int64)
    _check(ops.q_sample, x0, t, a, s, noise, grads_of=(0, 4))
    _check(ops.q_sample_philox, x0, t, a, s, 7, 11, grads_of=(0,))
    _check(ops.q_sample_keyed, x0, t, a, s, 7, first, grads_of=(0,))
    _check(ops.counter_timesteps, first, 7, n, steps)
    _check(ops.counter_uniform, first, 7, 3, n, 17)
    _check(ops.eps_mse, x0, noise.float(), grads_of=(0, 1))
    _check(ops.eps_mse_backward, torch.tensor(1.0), x0, noise)
    tables = [abar.sqrt().reciprocal(), (1 / abar - 1).sqrt(), abar, 1 - abar, (1 - abar).log()]
    _check(ops.ancestral_step, x0, noise, t, *tables, True, None, 7, 0)
    _check(ops.ddim_step, x0, noise, t, t - 1, abar, 0.5, True, None, 7, 0)


def test_every_registered_op_is_covered():
    """A new op must join the checks above (and COVERED)."""
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("jdm_fast::")}
    assert registered - NO_TENSORS - COVERED == set()
