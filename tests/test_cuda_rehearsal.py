"""The trainer's compiled CUDA step, rehearsed without a GPU (benchmarks/cuda_rehearsal.py).

The CIFAR preset's model in the trainer's own TrainStep (batch 256, bf16 autocast, channels-last,
keyed draws and dropout, attention at 16x16 through our Triton kernels and at 8x8 through SDPA)
on fake CUDA tensors: Dynamo with fullgraph=True and error_on_recompile over three steps,
AOTAutograd's joint graph and partitioner, and Inductor up to the point where a GPU is needed,
every kernel generated and compiled for sm_90. On the H200 run of 2026-12-01 this machinery
crashed: the per-op ``find_spec`` in the backend switch broke the graph into 47 pieces under torch
2.11, ``GroupNormSiLU`` recompiled until it went dynamic, and Inductor's pass over user Triton
kernels failed on the dynamic graph.

It runs in a subprocess: the test session runs Triton in its interpreter (tests/conftest.py),
where our launchers bypass ``wrap_triton`` and nothing would reach Inductor.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rehearsal_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cuda_rehearsal
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return cuda_rehearsal


def _rehearse(tmp_path: Path, *args: str) -> tuple[dict, str]:
    cuda_rehearsal = _rehearsal_module()
    why_not = cuda_rehearsal.supported()
    if why_not:  # torch 2.7 (the version floor): fake CUDA tensors initialise the device there
        pytest.skip(why_not)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), env.get("PYTHONPATH", "")])
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # a cold compile, as on a fresh machine
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_rehearsal.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1500)
    log = proc.stdout + proc.stderr[-6000:]
    assert out.exists(), log
    return json.loads(out.read_text()), log


@pytest.mark.slow
def test_the_cifar_training_step_compiles_for_cuda_as_one_graph_down_to_sm90_kernels(tmp_path):
    report, log = _rehearse(tmp_path, "--preset", "cifar10", "--batch", "256", "--steps", "3")
    our_kernels = _rehearsal_module().OUR_KERNELS
    # Dynamo: one graph for three keyed steps, no break, no recompile (error_on_recompile would raise)
    assert (report["graphs"], report["graph_breaks"], report["recompiles"]) == (1, 0, 0), log
    graph = report["dynamo_graphs"][0]
    assert {"jdm_fast.group_norm_silu_fwd.default", "jdm_fast.attention_fwd.default", "jdm_fast.q_sample_keyed",
            "jdm_fast.counter_timesteps", "jdm_fast.counter_uniform", "jdm_fast.eps_mse"} <= set(graph["custom_ops"])
    assert graph["sdpa"], "the 8x8 attention (64 tokens) runs SDPA on CUDA"
    # AOTAutograd: a forward and a backward graph, our kernels in both as functional Triton wrappers
    compiles = {c["graph"]: c for c in report["compiles"]}
    assert set(compiles) == {"forward", "backward"}, log
    for c in compiles.values():
        # Inductor: every pass, lowering, scheduling and code generation ran, and every kernel of the
        # graph (ours with the graph's specializations, and Inductor's) compiled for sm_90
        assert c["error"] is None, c["error"]
        assert c["triton_wrappers"] > 0
        ours = [k for k in c["kernels"] if k.startswith(our_kernels)]
        assert ours and len(c["kernels"]) > len(ours)
    backward_ours = {k.rstrip("0123456789").rstrip("_") for k in compiles["backward"]["kernels"]
                     if k.startswith(our_kernels)}
    assert {"_gn_bwd_kernel", "_sum_over_n_kernel"} <= backward_ours
    # the steps ran on: loss on the device, every parameter got a gradient and an AdamW step, the
    # gradients were cleared, the EMA lives on the device
    assert report["loss"] == {"device": "cuda:0", "dtype": "torch.float32", "shape": []}
    assert report["params_stepped"] == report["params"] > 0 and report["scaler_enabled"]
    assert report["grads_cleared"] and report["ema_device"] == "cuda:0"
