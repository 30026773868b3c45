"""Where a training step's GPU time goes: a digest of a torch.profiler trace.

    python benchmarks/profile_digest.py trace_engine.json.gz --steps 3 [--out digest.json]

``record`` profiles a few steps (torch.profiler, CPU + CUDA activities), writes the chrome trace
gzipped (small: CPU-side events are dropped when the trace would pass ``MAX_TRACE_BYTES``) and
returns the digest of its GPU events: the ``top`` costliest kernels by total time, and the time per
category (``categorize``: convolution, matmul, GroupNorm, attention, other elementwise, optimizer
+ EMA, copies) plus the idle gaps between kernels (the GPU's span from the first kernel's start to
the last one's end, less the union of the kernels' intervals). Every number is per step. The
categories come from kernel names (cuDNN/cuBLAS/CUTLASS names, ATen's kernels, Inductor's
``triton_{poi,red,per,tem}_fused_<ops>_<n>``, our Triton kernels): a heuristic, unit-tested on
synthetic names in tests/test_profile_digest.py. benchmarks/report.py renders the digest.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

CATEGORIES = ("convolution", "matmul", "GroupNorm", "attention", "other elementwise", "optimizer + EMA", "copies")
IDLE = "idle gaps"
GPU_EVENT_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
MAX_TRACE_BYTES = 4 * 2**20

_ATTENTION = ("attn", "attention", "flash", "fmha", "sdpa", "softmax")
_GROUP_NORM = ("group_norm", "groupnorm", "_gn_", "rowwisemoments", "computefusedparams", "computeinternalgradients",
               "computebackwardfusedparams", "gammabetabackward")
_OPTIMIZER = ("adam", "multi_tensor_apply", "lerp", "_amp_", "amp_update_scale", "unscale", "foreach")
_COPIES = ("memcpy", "memset", "copy", "nchwtonhwc", "nhwctonchw", "transpose", "permute", "catarraybatched",
           "fillfunctor")
_CONV = ("conv", "fprop", "dgrad", "wgrad", "winograd", "implicit_convolve")
_MATMUL = ("gemm", "nvjet", "cublas", "cutlass", "splitkreduce", "matmul", "s16816", "s1688")
# Inductor kernels whose fused ops only move or cast data (the ops list left empty without them)
_MOVES = re.compile(r"_?to_copy|clone|copy|cat|permute|transpose|view|constant_pad_nd|stack|slice|select|"
                    r"new_zeros|zeros|full|fill|empty|expand|unsqueeze|squeeze")
_INDUCTOR = re.compile(r"^triton_(?P<kind>[a-z]+)_(?:fused_)?(?P<ops>.*?)(?:_\d+)?$")


def categorize(name: str, cat: str = "kernel") -> str:
    """The category of one GPU event (``cat`` is the trace's: kernel, gpu_memcpy, gpu_memset)."""
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "copies"
    n = name.lower()
    m = _INDUCTOR.match(n)
    if m:  # Inductor's generated kernels: the aten ops they fuse are in the name
        ops, kind = m["ops"], m["kind"]
        if "group_norm" in ops:
            return "GroupNorm"
        if any(k in ops for k in ("attention", "sdpa", "flash")):
            return "attention"
        if kind == "tem":  # templates: Inductor's own matmul / convolution kernels
            return "convolution" if "conv" in ops else "matmul"
        if any(k in ops for k in ("adam", "lerp", "foreach")):
            return "optimizer + EMA"
        if ops and not re.sub(r"[_\d]+", "", _MOVES.sub("", ops)):
            return "copies"
        return "other elementwise"
    n = n.replace("convert", "cvt")  # flash_bwd_convert_dq_kernel, type conversions: not convolutions
    for category, keys in (("attention", _ATTENTION), ("GroupNorm", _GROUP_NORM), ("optimizer + EMA", _OPTIMIZER),
                           ("copies", _COPIES), ("convolution", _CONV), ("matmul", _MATMUL)):
        if any(k in n for k in keys):
            return category
    return "other elementwise"


def gpu_events(events: list[dict]) -> list[dict]:
    """The complete ("ph": "X") GPU-side events of a chrome trace's ``traceEvents``."""
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_EVENT_CATS and "dur" in e]


def busy_and_span_us(events: list[dict]) -> tuple[float, float]:
    """(union of the events' intervals, first start to last end), in microseconds."""
    intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    if not intervals:
        return 0.0, 0.0
    busy, (start, end) = 0.0, intervals[0]
    first = start
    last = end
    for s, e in intervals[1:]:
        last = max(last, e)
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, last - first


def digest(events: list[dict], steps: int, top: int = 30) -> dict:
    """Per-step GPU time per category and of the ``top`` costliest kernels (by name) of a trace."""
    gpu = gpu_events(events)
    busy, span = busy_and_span_us(gpu)
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    kernels: dict[str, dict] = {}
    for e in gpu:
        c = categorize(e.get("name", ""), e.get("cat", "kernel"))
        per_cat[c] += float(e["dur"])
        k = kernels.setdefault(e.get("name", "?"), {"name": e.get("name", "?"), "category": c, "calls": 0, "us": 0.0})
        k["calls"] += 1
        k["us"] += float(e["dur"])
    ms = 1e-3 / max(steps, 1)
    idle = max(span - busy, 0.0)
    categories = [{"category": c, "ms/step": us * ms, "fraction": us / span if span else None}
                  for c, us in sorted(per_cat.items(), key=lambda kv: -kv[1])]
    categories.append({"category": IDLE, "ms/step": idle * ms, "fraction": idle / span if span else None})
    ranked = sorted(kernels.values(), key=lambda k: -k["us"])[:top]
    return {"kind": "profile_digest", "steps": steps, "gpu_events": len(gpu), "distinct_kernels": len(kernels),
            "span_ms/step": span * ms, "busy_ms/step": busy * ms, "idle_ms/step": idle * ms,
            "categories": categories,
            "kernels": [{"name": k["name"], "category": k["category"], "calls/step": k["calls"] / max(steps, 1),
                         "ms/step": k["us"] * ms, "fraction_of_busy": k["us"] / busy if busy else None}
                        for k in ranked]}


def write_trace(events: dict, path: Path, max_bytes: int = MAX_TRACE_BYTES) -> str:
    """Gzip a chrome trace to ``path``; past ``max_bytes`` keep only the GPU events (+ metadata),
    then only the first of them that fit. Returns what was kept."""
    def dump(obj) -> bytes:
        return gzip.compress(json.dumps(obj, separators=(",", ":")).encode(), compresslevel=6)

    data, kept = dump(events), "full trace"
    if len(data) > max_bytes:
        trace = dict(events)
        evs = [e for e in events.get("traceEvents", []) if e.get("ph") == "M" or e.get("cat") in GPU_EVENT_CATS]
        trace["traceEvents"] = evs
        data, kept = dump(trace), "GPU events only (CPU side dropped: size)"
        while len(data) > max_bytes and len(evs) > 100:
            evs = evs[: len(evs) * 3 // 4]
            trace["traceEvents"] = evs
            data, kept = dump(trace), f"first {len(evs)} GPU events only (size)"
    path.write_bytes(data)
    return kept


def record(step, x, y, steps: int, device, trace_path: Path, top: int = 30) -> dict:
    """Profile ``steps`` calls of ``step(x, y)``; write the gzipped chrome trace; return the digest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        events = json.loads(raw.read_text())
    kept = write_trace(events, trace_path)
    d = digest(events.get("traceEvents", []), steps, top)
    d.update(trace=trace_path.name, trace_kept=kept, trace_mib=trace_path.stat().st_size / 2**20)
    if not d["gpu_events"]:
        d["note"] = "no GPU kernels in the trace (a CPU run)"
    return d


def load_trace(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="chrome trace (.json or .json.gz) of torch.profiler")
    p.add_argument("--steps", type=int, required=True, help="how many steps the trace holds")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, help="write the digest JSON here (default: stdout)")
    args = p.parse_args(argv)
    d = digest(load_trace(args.trace).get("traceEvents", []), args.steps, args.top)
    d["trace"] = args.trace.name
    text = json.dumps(d, indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
