"""Which implementation an op runs: the one switch of DESIGN.md.

``JDM_FAST_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference``, or the context manager
``jdm_fast.ops.backend("triton")`` (it wins over the variable). ``auto`` runs Triton on CUDA tensors
and the PyTorch reference elsewhere. Forcing ``triton`` on CPU tensors runs the kernels in
Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is first imported (the
test suite's conftest does this).

The override is a module global rather than a ContextVar so that torch.compile reads it as a
constant while tracing (a ContextVar lookup would break the graph); it is not thread-local.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")
_override: list[str] = []  # stack of active `backend(...)` contexts
_warned: set[str] = set()


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Force a backend inside the block: ``with jdm_fast.ops.backend("reference"): ...``."""
    _override.append(_check(name, "backend"))
    try:
        yield
    finally:
        _override.pop()


def current_backend() -> str:
    if _override:
        return _override[-1]
    return _check(os.environ.get("JDM_FAST_BACKEND", "auto").strip().lower() or "auto", "JDM_FAST_BACKEND")


_TRITON = importlib.util.find_spec("triton") is not None  # once: torch.compile cannot trace find_spec


def triton_available() -> bool:
    return _TRITON


def use_triton(device: torch.device, op: str) -> bool:
    """True when ``op`` on tensors of ``device`` should run its Triton kernels."""
    choice = current_backend()
    if choice == "reference":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' was forced but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{op}: backend 'triton' on {device.type} tensors runs Triton's interpreter, which needs "
                "TRITON_INTERPRET=1 set before triton is imported")
        return True
    if device.type != "cuda":
        return False
    if not triton_available():
        if "triton" not in _warned:
            _warned.add("triton")
            warnings.warn("jdm_fast: triton is not installed; CUDA tensors use the PyTorch reference ops",
                          stacklevel=3)
        return False
    return True
