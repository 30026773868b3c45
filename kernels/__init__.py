"""Triton kernels of jdm_fast, installed as ``jdm_fast.kernels``.

Only ``@triton.jit`` functions and small launchers live here (DESIGN.md): the fused
GroupNorm+FiLM+SiLU (``group_norm``) and flash attention (``attention``) kernels. The launchers
trust their inputs; ``jdm_fast.ops`` validates them and decides which implementation runs.
"""
