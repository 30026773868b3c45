"""Static GPU resources of every Triton kernel of jdm_fast, without a GPU.

    python benchmarks/kernel_resources.py                  # every kernel x config x dtype, sm_90 and sm_80
    python benchmarks/kernel_resources.py --write BENCHMARKS.md   # and replace its resource table

Each kernel is compiled ahead of time (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cap, 32))``, as tests/kernels do), its PTX is assembled by the ``ptxas`` Triton ships with
``-v``, and the report gives registers per thread, spill stores / loads, barriers, the shared
memory the launch asks for (Triton's dynamic allocation) and the theoretical occupancy: resident
warps per SM from the architecture's limits (65,536 registers in 256-register warp allocations,
64 warps, 32 blocks, shared memory 227 KiB per SM on sm_90 / 163 KiB on sm_80, per-block
reservation of 1 KiB).

``resources(jobs)`` is the library entry the tests use (tests/kernels/test_kernel_resources.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Per SM: registers, max warps, max blocks, shared memory for blocks (bytes), reservation per block
ARCH = {90: (65536, 64, 32, 227 * 1024, 1024), 80: (65536, 64, 32, 163 * 1024, 1024)}
MARK_BEGIN = "<!-- kernel_resources: begin (benchmarks/kernel_resources.py --write) -->"
MARK_END = "<!-- kernel_resources: end -->"

# Compiles in a subprocess without TRITON_INTERPRET (the test suite sets it; compiling needs the
# real JITFunctions). Reads [module, kind, config index, dtype, cap, kwargs] jobs on stdin.
_COMPILER = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from jdm_fast.kernels._launch import compile_options

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = []
for module, kind, index, dt, cap, kwargs in json.loads(sys.stdin.read()):
    mod = importlib.import_module(module)
    cfg = None if index is None else mod.ALL_CONFIGS[index]
    rec = {"module": module.rsplit(".", 1)[-1], "kind": kind, "config": index, "dtype": dt, "cap": cap,
           "kwargs": kwargs}
    options = compile_options(cfg, kind)
    rec["num_warps"] = options["num_warps"]
    try:
        fn, sig, const = mod.aot_compile_args(kind, cfg, dt, **kwargs)
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", cap, 32),
                           options=options)
        ptx = k.asm["ptx"]
        arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        res = subprocess.run([PTXAS, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        info = res.stdout + res.stderr
        num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else 0  # noqa: E731
        rec.update(arch=arch, shared=k.metadata.shared, registers=num(r"Used (\d+) registers"),
                   spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                   barriers=num(r"used (\d+) barriers"), stack=num(r"(\d+) bytes stack frame"))
        if res.returncode:
            rec["error"] = info[-500:]
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
    out.append(rec)
print(json.dumps(out))
"""


def occupancy(cap: int, registers: int, num_warps: int, shared: int) -> tuple[int, str]:
    """(resident warps per SM, the limiting resource) from the architecture's per-SM limits."""
    regs_sm, max_warps, max_blocks, smem_sm, reserve = ARCH[cap]
    regs_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    limits = {"registers": regs_sm // (regs_warp * num_warps), "warps": max_warps // num_warps, "blocks": max_blocks,
              "shared memory": smem_sm // (shared + reserve) if shared else max_blocks}
    blocks = min(limits.values())
    return blocks * num_warps, min(limits, key=limits.get)


def resources(jobs: list, shards: int = 2) -> list[dict]:
    """Compile and assemble each job ``(module, kind, config index or None, dtype, cap, kwargs)``
    (module: ``jdm_fast.kernels.group_norm`` / ``.attention``) and return its resource record."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(shards)]
    records = []
    for i, p in enumerate(procs):
        out, err = p.communicate(json.dumps(jobs[i::shards]), timeout=1800)
        if p.returncode:
            raise RuntimeError(f"kernel compile worker failed:\n{err[-3000:]}")
        records += json.loads(out.strip().splitlines()[-1])
    for r in records:
        if "error" not in r:
            r["warps_per_sm"], r["limited_by"] = occupancy(r["cap"], r["registers"], r["num_warps"], r["shared"])
            r["occupancy"] = r["warps_per_sm"] / ARCH[r["cap"]][1]
    return records


def all_jobs(caps=(90, 80), dtypes=("fp32", "bf16")) -> list:
    sys.path.insert(0, str(ROOT))
    from jdm_fast.kernels import attention, group_norm

    jobs = []
    for cap in caps:
        for dt in dtypes:
            for i in range(len(group_norm.ALL_CONFIGS)):
                jobs += [("jdm_fast.kernels.group_norm", kind, i, dt, cap, {}) for kind in ("fwd", "bwd")]
            jobs.append(("jdm_fast.kernels.group_norm", "reduce", None, dt, cap, {}))
            for i in range(len(attention.ALL_CONFIGS)):
                jobs += [("jdm_fast.kernels.attention", kind, i, dt, cap, {}) for kind in attention.KERNEL_KINDS]
    return jobs


def _describe(r: dict) -> str:
    if r["config"] is None:
        return "-"
    sys.path.insert(0, str(ROOT))
    import importlib
    cfg = importlib.import_module(f"jdm_fast.kernels.{r['module']}").ALL_CONFIGS[r["config"]]
    if r["module"] == "group_norm":
        return f"{'single' if cfg.single_pass else 'looped'} {cfg.block_c}x{cfg.block_hw}"
    return f"M{cfg.block_m} N{cfg.block_n} D{cfg.block_d} s{cfg.num_stages}"


def table(records: list[dict]) -> str:
    head = ("| kernel | config | dtype | arch | warps | registers | spill st/ld (B) | barriers | shared (B) "
            "| warps/SM | occupancy | limited by |")
    lines = [head, "|" + "---|" * 12]
    for r in sorted(records, key=lambda r: (r["module"], r["kind"], r["config"] or 0, r["dtype"], -r["cap"])):
        if "error" in r:
            lines.append(f"| {r['module']}.{r['kind']} | {_describe(r)} | {r['dtype']} | sm_{r['cap']} | "
                         f"compile error: {r['error'][:80]} |||||||")
            continue
        lines.append(f"| {r['module']}.{r['kind']} | {_describe(r)} | {r['dtype']} | {r['arch']} | {r['num_warps']} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['barriers']} | {r['shared']} | "
                     f"{r['warps_per_sm']} | {r['occupancy']:.0%} | {r['limited_by']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caps", type=int, nargs="+", default=[90, 80], choices=sorted(ARCH))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--write", type=Path, help="replace the table between the markers in this markdown file")
    args = p.parse_args(argv)
    import triton

    records = resources(all_jobs(tuple(args.caps), tuple(args.dtypes)))
    spills = [r for r in records if r.get("spill_stores") or r.get("spill_loads")]
    errors = [r for r in records if "error" in r]
    text = (f"{len(records)} compiles with triton {triton.__version__} (ptxas -v), "
            f"{len(spills)} with spills, {len(errors)} errors.\n\n{table(records)}\n")
    print(text)
    if args.write:
        doc = args.write.read_text()
        if MARK_BEGIN not in doc or MARK_END not in doc:
            raise SystemExit(f"{args.write}: no {MARK_BEGIN} ... {MARK_END} markers")
        a, b = doc.index(MARK_BEGIN) + len(MARK_BEGIN), doc.index(MARK_END)
        args.write.write_text(doc[:a] + "\n" + text + doc[b:])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
