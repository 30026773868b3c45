"""benchmarks/fake_cuda.py's autodiff executor computes what PyTorch's autograd engine computes.

The CUDA-step rehearsal (tests/test_cuda_rehearsal.py) traces its backward through this Python
executor, since the C++ engine cannot run a graph of fake CUDA tensors without a CUDA driver. Here,
on real CPU tensors, it must give the engine's gradients exactly: through C++ nodes, a custom op's
autograd (a Function with non-tensor arguments and unused non-differentiable outputs), a Function
whose first argument is a number, broadcast shapes, dtype casts, a tensor used twice, an input that
gets no gradient, and ``.grad`` accumulation.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from jdm_fast.nn import GroupNormSiLU

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fake_cuda  # noqa: E402


def _net():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 8, 3, padding=1), "norm": GroupNormSiLU(2, 8)})


class _Scale(torch.autograd.Function):
    """k * t with the number first: the node's one edge is its second argument's."""

    @staticmethod
    def forward(ctx, k, t):
        ctx.k = k
        return t * k

    @staticmethod
    def backward(ctx, grad):
        return None, grad * ctx.k


def _loss(net, x, shift, unused):
    h = net["norm"](net["conv"](_Scale.apply(0.5, x)))  # GroupNormSiLU: a C++ custom op with registered autograd
    h = h + shift  # broadcast (8, 1, 1) against (N, 8, H, W): the engine sums the gradient down
    h = (h.to(torch.bfloat16) * 1.5).float()  # dtype casts both ways
    return (h * h).mean() + h.sum() * 1e-3 + 0 * unused.detach().sum()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 5, generator=g, requires_grad=True)
    shift = torch.randn(8, 1, 1, generator=g, requires_grad=True)
    unused = torch.randn(3, requires_grad=True)  # reaches the loss only through a detach
    return x, shift, unused


def test_grad_equals_the_engine():
    net = _net()
    x, shift, unused = _inputs()
    wrt = [x, shift, unused, *net.parameters()]
    want = torch.autograd.grad(_loss(net, x, shift, unused), wrt, allow_unused=True)
    with fake_cuda.python_autograd():
        got = torch.autograd.grad(_loss(net, x, shift, unused), wrt, allow_unused=True)
    assert got[2] is None and want[2] is None
    for a, b in zip(got, want):
        if b is not None:
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_accumulates_into_grad_as_the_engine():
    net_ref, net = _net(), _net()
    x_ref, shift_ref, unused_ref = _inputs()
    x, shift, unused = _inputs()
    for _ in range(2):  # the second pass accumulates
        _loss(net_ref, x_ref, shift_ref, unused_ref).backward()
        with fake_cuda.python_autograd():
            _loss(net, x, shift, unused).backward()
    assert unused.grad is None and unused_ref.grad is None
    for a, b in zip([x, shift, *net.parameters()], [x_ref, shift_ref, *net_ref.parameters()]):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_the_executor_is_what_runs():
    """Inside the block torch.autograd.grad is the executor (not the engine under another name)."""
    with fake_cuda.python_autograd():
        assert torch.autograd.grad is fake_cuda.grad and torch.autograd.backward is fake_cuda.backward
    assert torch.autograd.grad is not fake_cuda.grad
