"""Triton kernels of jdm_fast, installed as ``jdm_fast.kernels``.

Only ``@triton.jit`` functions and small launchers live here (DESIGN.md); the fused GroupNorm+SiLU
and attention kernels arrive with issues 3 and 4. ``jdm_fast.ops`` decides which implementation runs.
"""
