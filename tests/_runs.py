"""Helpers of the subprocess trainer tests (test_distributed.py, test_resume.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from jdm_fast.checkpoint import load_checkpoint

# The "tiny" preset, shortened: a few seconds of CPU per run.
TINY_ARGS = ["--preset", "tiny", "--device", "cpu", "--batch-size", "16", "--eval-every", "1000",
             "--num-samples", "4", "--sample-steps", "2", "--log-every", "2"]


def env() -> dict:
    """One thread per process (as torchrun sets it), so every run does the same float math."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    return e


def train_cmd(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "jdm_fast.train", *TINY_ARGS, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "jdm_fast.train", *TINY_ARGS, *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def max_rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|a| (floating-point tensors only)."""
    worst = 0.0
    assert a.keys() == b.keys()
    for k in a:
        if not torch.is_floating_point(a[k]):
            assert torch.equal(a[k], b[k]), k
            continue
        scale = a[k].abs().max().item() or 1.0
        worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst


def global_rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all floating-point tensors together (float64 sums)."""
    num = den = 0.0
    for k in a:
        if torch.is_floating_point(a[k]):
            num += (a[k].double() - b[k].double()).square().sum().item()
            den += a[k].double().square().sum().item()
    return (num / den) ** 0.5


def final_state(out: Path) -> dict:
    return load_checkpoint(Path(out) / "checkpoint.pt")
