"""Operators of jdm_fast: the only place that decides which implementation runs (DESIGN.md).

``group_norm_silu`` and ``attention`` run fused Triton kernels on CUDA tensors and their PyTorch
references elsewhere (``backends.py`` decides); the C++/CUDA noise-schedule ops (issue 5) slot in
here too, so callers (``jdm_fast.nn``, ``jdm_fast.models``) never change.
"""
from jdm_fast.ops.attention import attention
from jdm_fast.ops.backends import BACKENDS, backend, current_backend
from jdm_fast.ops.norm import group_norm_silu

__all__ = ["BACKENDS", "attention", "backend", "current_backend", "group_norm_silu"]
