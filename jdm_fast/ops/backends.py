"""Which implementation an op runs: the one switch of DESIGN.md.

Two environment variables are read once, when this module is first imported (``SETTINGS``), and
never again; setting them later in the process changes nothing:

- ``JDM_FAST_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference``. ``auto`` runs Triton on
  CUDA tensors and the PyTorch reference elsewhere. An unknown value raises at import.
- ``TRITON_INTERPRET=1``: Triton runs its interpreter. Forcing ``triton`` on CPU tensors needs it,
  and Triton itself reads it when it is first imported (the test suite's conftest sets it before).

Inside a process, the context manager ``jdm_fast.ops.backend(name)`` overrides the default for
the block (the innermost block wins): ``with jdm_fast.ops.backend("reference"): ...``.
``current_backend()`` is the backend in force. Tests that need other settings replace
``SETTINGS`` (``Settings.from_environment({...})`` builds them from a mapping).

The override stack is a module global rather than a ContextVar so that torch.compile reads it as a
constant while tracing (a ContextVar lookup would break the graph); it is not thread-local.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import warnings
from typing import Iterator, Mapping

import torch

__all__ = ["BACKENDS", "SETTINGS", "Settings", "backend", "current_backend", "triton_available", "use_triton"]

BACKENDS = ("auto", "triton", "reference")


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@dataclasses.dataclass(frozen=True)
class Settings:
    """The environment's choices, read once (see the module docstring)."""

    backend: str = "auto"  # JDM_FAST_BACKEND
    triton_interpret: bool = False  # TRITON_INTERPRET=1

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        name = environ.get("JDM_FAST_BACKEND", "auto").strip().lower() or "auto"
        return cls(backend=_check(name, "JDM_FAST_BACKEND"),
                   triton_interpret=environ.get("TRITON_INTERPRET") == "1")


SETTINGS = Settings.from_environment()
_override: list[str] = []  # the active `backend(...)` blocks, innermost last
_warned: set[str] = set()  # warnings given once per process
_TRITON = importlib.util.find_spec("triton") is not None  # once: torch.compile cannot trace find_spec


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend inside the block: ``with jdm_fast.ops.backend("reference"): ...``."""
    _override.append(_check(name, "backend"))
    try:
        yield
    finally:
        _override.pop()


def current_backend() -> str:
    """The innermost ``backend(...)`` block's choice, else ``JDM_FAST_BACKEND`` as read at import."""
    return _override[-1] if _override else SETTINGS.backend


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
        if device.type != "cuda" and not SETTINGS.triton_interpret:
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
