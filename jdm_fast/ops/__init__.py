"""Operators of jdm_fast: the only place that decides which implementation runs (DESIGN.md).

``group_norm_silu`` and ``attention`` run fused Triton kernels on CUDA tensors and their PyTorch
references elsewhere (``backends.py`` decides). The noise-schedule ops (``noise``: q_sample,
q_sample_philox, eps_mse, fused ancestral/DDIM steps) run the C++/CUDA extension ``jdm_fast._C``
(loaded by ``_extension.py``), or their PyTorch references (``noise_reference.py``) where it was not
built or under ``backend("reference")``. Callers (``jdm_fast.nn``, ``jdm_fast.models``,
``jdm_fast.diffusion``) never choose an implementation themselves.
"""
from jdm_fast.ops.attention import attention
from jdm_fast.ops.backends import BACKENDS, backend, current_backend
from jdm_fast.ops.norm import group_norm_silu
from jdm_fast.ops import noise

__all__ = ["BACKENDS", "attention", "backend", "current_backend", "group_norm_silu", "noise"]
