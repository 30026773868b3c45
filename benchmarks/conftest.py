"""Benchmarks: pytest-benchmark suites. GPU cases skip with a reason on machines without CUDA."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--cpu-compile", action="store_true", default=False,
                     help="also measure the torch.compile training-step variants on CPU (minutes of compilation)")


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this machine has none)")
    return torch.device("cuda")
