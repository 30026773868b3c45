"""The AVX2 and baseline (SSE2) builds of the C++ CPU kernels (GroupNorm+SiLU, counter_uniform),
which an AVX-512 machine never picks by itself: each is selected with JDM_FAST_CPU_ISA in a fresh
process that runs the kernels' own tests (float64 references, the NumPy Philox reference, the keyed
dropout masks); a bad value is refused by name."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jdm_fast.ops._extension import HAS_C

pytestmark = pytest.mark.skipif(not HAS_C, reason="jdm_fast._C was not built")
ROOT = Path(__file__).resolve().parents[1]
ISAS = ("baseline", "avx2", "avx512")
# the tests whose kernels have per-ISA builds
KERNEL_TESTS = ["tests/test_group_norm_cpu.py", "tests/test_cpu_isa.py::test_kernels_run_the_isa_the_environment_names",
                "tests/test_noise_ops.py::test_counter_draws_equal_the_documented_reference",
                "tests/test_noise_ops.py::test_counter_draws_are_per_example_and_uniform",
                "tests/test_models.py::test_keyed_unet_dropout_masks_follow_the_philox_reference"]


def _run(isa: str | None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("JDM_FAST_CPU_ISA", None)
    if isa is not None:
        env["JDM_FAST_CPU_ISA"] = isa
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _detected() -> str:
    proc = _run(None, "-c", "import torch, jdm_fast.ops; print(torch.ops.jdm_fast.cpu_kernel_isa())")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_kernels_run_the_isa_the_environment_names():
    isa = torch.ops.jdm_fast.cpu_kernel_isa()
    assert isa == os.environ.get("JDM_FAST_CPU_ISA", isa) and isa in ISAS


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_lower_isa_builds_pass_the_kernel_tests(isa):
    if ISAS.index(isa) > ISAS.index(_detected()):
        pytest.skip(f"this CPU lacks {isa}")
    proc = _run(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS)
    assert proc.returncode == 0, f"JDM_FAST_CPU_ISA={isa}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_a_bad_isa_is_refused_by_name():
    code = "import torch; from jdm_fast.ops import group_norm_silu; group_norm_silu(torch.randn(2, 4, 3, 3), 2)"
    proc = _run("avx1024", "-c", code)
    assert proc.returncode != 0
    assert "JDM_FAST_CPU_ISA must be avx512, avx2 or baseline, got 'avx1024'" in proc.stderr
    if _detected() != "avx512":
        proc = _run("avx512", "-c", code)
        assert proc.returncode != 0 and "this CPU supports at most" in proc.stderr
