"""Benchmarks: pytest-benchmark suites. GPU cases skip with a reason on machines without CUDA."""
import pytest
import torch


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this machine has none)")
    return torch.device("cuda")
