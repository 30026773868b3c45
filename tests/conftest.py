"""Test-suite set-up: Triton kernels run in Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection
start. On a machine with CUDA the kernel tests run on the GPU instead (JDM_FAST_GPU_TESTS=1 or a
visible GPU leaves the variable alone).
"""
import os

import pytest

if "TRITON_INTERPRET" not in os.environ and os.environ.get("JDM_FAST_GPU_TESTS") != "1":
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """Triton's CPU interpreter stores bf16 as uint16 bit patterns and np.matmul's the bits in
    tl.dot (triton 3.8): under TRITON_INTERPRET, widen bf16 dot operands to fp32 first (exact, as
    a bf16 tensor-core dot with fp32 accumulation is). Test-only; the kernels are unchanged."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype.scalar == tl.bfloat16:
            f32 = (t.data.astype(np.uint32) << 16).view(np.float32)
            return interp.TensorHandle(f32, tl.float32)
        return t

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *args: original(self, widen(a), widen(b), d, *args))
