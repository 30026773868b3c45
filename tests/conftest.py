"""Test-suite set-up: Triton kernels run in Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection
start. On a machine with CUDA the kernel tests run on the GPU instead (JDM_FAST_GPU_TESTS=1 or a
visible GPU leaves the variable alone).
"""
import os

if "TRITON_INTERPRET" not in os.environ and os.environ.get("JDM_FAST_GPU_TESTS") != "1":
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
