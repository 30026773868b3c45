"""Shared ahead-of-time compile harness for the kernel tests.

``aot_compile(module, jobs)`` compiles each job with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cap, 32))`` -- no GPU needed -- in two subprocesses without
TRITON_INTERPRET (so the kernels are real JITFunctions), and returns one record per job:
the job, the produced ``asm`` kinds, ``shared`` memory bytes, whether the PTX uses tensor cores,
or the ``error`` of a failed compile. A job is ``(kind, config index or None, dtype, cap, kwargs)``
for ``module.aot_compile_args(kind, module.ALL_CONFIGS[index], dtype, **kwargs)``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, sm_80 / sm_90

_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from jdm_fast.kernels._launch import compile_options

mod = importlib.import_module(sys.argv[1])
out = []
for kind, index, dt, cap, kwargs in json.loads(sys.stdin.read()):
    cfg = None if index is None else mod.ALL_CONFIGS[index]
    rec = {"job": f"{kind} {cfg} {dt} sm_{cap} {kwargs}", "kind": kind, "dt": dt, "cap": cap}
    options = compile_options(cfg, kind)
    try:
        fn, sig, const = mod.aot_compile_args(kind, cfg, dt, **kwargs)
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", cap, 32),
                           options=options)
        rec.update(asm=sorted(k.asm), shared=k.metadata.shared,
                   tensor_core=("mma" in k.asm["ptx"]) or ("wgmma" in k.asm["ptx"]))
    except Exception as e:  # reported by the test, with the job that failed
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    out.append(rec)
print(json.dumps(out))
"""


def _run(module: str, jobs: list, nshards: int = 2) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JITFunctions
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, module], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(nshards)]
    records = []
    for shard, p in enumerate(procs):
        out, err = p.communicate(json.dumps(jobs[shard::nshards]), timeout=600)
        assert p.returncode == 0, err[-4000:]
        records += json.loads(out.strip().splitlines()[-1])
    assert len(records) == len(jobs)
    errors = [(r["job"], r["error"]) for r in records if "error" in r]
    assert not errors, errors[:5]
    for r in records:
        assert {"cubin", "ptx"} <= set(r["asm"]), r["job"]
        assert r["shared"] <= SHARED_MEMORY_LIMIT[r["cap"]], r
    return records


@pytest.fixture
def aot_compile():
    return _run
