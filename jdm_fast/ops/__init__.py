"""Operators of jdm_fast: the only place that decides which implementation runs (DESIGN.md).

Today every op runs its plain-PyTorch reference path; the fused Triton kernels (issues 3, 4) and
the C++/CUDA noise-schedule ops (issue 5) slot in behind these same functions, so callers
(``jdm_fast.nn``, ``jdm_fast.models``) never change.
"""
from jdm_fast.ops.attention import attention
from jdm_fast.ops.norm import group_norm_silu

__all__ = ["attention", "group_norm_silu"]
