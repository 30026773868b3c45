"""Helpers of the tests that compare two ways of computing the joint loss (test_models.py,
test_step.py, test_baseline.py): same loss terms and gradients, on weights where every layer
matters, and no hidden copies (``Copies``)."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@contextlib.contextmanager
def one_thread():
    """Intra-op threads pinned to 1 inside the block. With 2, oneDNN blocks a convolution over a
    batch of 2B differently from one over B, so the x_cls half of the one-encoder-call batch differs
    from the two-call path's by ~1e-7 relative; the head's BatchNorm bias gradient, a nearly
    cancelling sum, amplifies that to ~1.2e-5 (measured, 2-core AMD EPYC). That is thread noise, not
    what the comparison tests; and without the pin the result depended on test order (the session
    fixture generation_fixtures.trained_run holds one thread for every test after it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def perturb_zero_params(model: torch.nn.Module, std: float = 0.05) -> None:
    """Draw N(0, std) into every all-zero parameter: zero-initialised output convs would hide the
    decoder's gradients."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, std)


def assert_same_losses_and_grads(actual_model, actual, expected_model, expected, rtol: float = 1e-5) -> None:
    """``actual`` and ``expected`` (JointLoss of the two models) agree term by term (rtol, atol 1e-7),
    and after backward every parameter gradient agrees in relative L2 norm (<= rtol)."""
    for term in ("total", "diffusion", "classifier"):
        torch.testing.assert_close(getattr(actual, term), getattr(expected, term), rtol=rtol, atol=1e-7, msg=term)
    actual.total.backward()
    expected.total.backward()
    for (name, pa), pe in zip(actual_model.named_parameters(), expected_model.parameters()):
        err = (pa.grad - pe.grad).norm() / pe.grad.norm().clamp_min(1e-30)
        assert err <= rtol, (name, err.item())


class Copies(TorchDispatchMode):
    """Records every copying aten op (clone, copy_, _to_copy; ``.contiguous()`` and ``.reshape()``
    dispatch a clone when they must copy) dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(k in name for k in ("clone", "copy_", "_to_copy")):
            self.copies.append(name)
        return func(*args, **(kwargs or {}))
