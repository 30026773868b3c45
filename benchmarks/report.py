"""Markdown tables from benchmark results.

    python benchmarks/report.py bench.json [train.json ...] [--out FILE]

``bench.json`` is what ``pytest benchmarks/ --benchmark-only --benchmark-json bench.json`` writes:
one table per benchmark group (the test function when no group is set) with the case, the mean
time, what its extra_info measured (images/s, GB/s, TFLOP/s, fraction of peak, peak memory),
every ratio/speedup to a baseline, and the device. ``train.json`` is what
benchmarks/train_throughput.py writes: one table, one row per variant (median / min / max
images/s over the timed windows, ratios, compile time, SM clock and temperature). A profile
digest (benchmarks/profile_digest.py, ``profile_<variant>.json``): GPU time per category and the
costliest kernels. Each file's section starts with the date, machine and versions it was measured
with. ``--brief``: the digests' category tables and top 5 kernels only (gpu_check's summary).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("images/s", "steps/s", "GB/s", "TFLOP/s", "fraction_of_peak", "fraction_of_peak_bw", "bound_ms",
           "bound_measured_ms", "fraction_of_bound", "GFLOP/image", "peak_mem_mb", "precision", "compile",
           "baseline_fp32_ms", "baseline_amp_ms", "baseline_amp_compile_ms")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01 or a == 0:
            return f"{v:.3g}" if a < 1 else f"{v:.2f}"
        return f"{v:.2e}"
    return str(v).replace("|", "\\|")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _first(items: list[dict], key: str):
    return next((i[key] for i in items if i.get(key) is not None), None)


def _machine(info: dict) -> str:
    cpu = (info.get("cpu") or {}).get("brand_raw") or info.get("processor") or info.get("machine") or "?"
    return f"{info.get('node', '?')} ({cpu}, {info.get('system', '?')} {info.get('release', '')})".strip()


def _ratio_keys(extras: list[dict]) -> list[str]:
    keys: list[str] = []
    for e in extras:
        for k in e:
            if (k.startswith("ratio") or k.startswith("speedup")) and k not in keys:
                keys.append(k)
    return keys


def render_pytest(data: dict, source: str) -> str:
    benches = data.get("benchmarks", [])
    extras = [b.get("extra_info") or {} for b in benches]
    devices = sorted({e["device"] for e in extras if e.get("device")})
    out = [f"## {source}", "",
           f"- date: {data.get('datetime', '?')}",
           f"- machine: {_machine(data.get('machine_info') or {})}",
           f"- devices: {', '.join(devices) or '?'}",
           f"- torch {_first(extras, 'torch') or '?'}, triton {_first(extras, 'triton') or '-'}, "
           f"python {(data.get('machine_info') or {}).get('python_version', '?')}, "
           f"pytest-benchmark {data.get('version', '?')}", ""]
    if not benches:
        return "\n".join(out + ["(no benchmarks ran)", ""])
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or b["name"].split("[")[0], []).append(b)
    for group, items in groups.items():
        ex = [b.get("extra_info") or {} for b in items]
        metrics = [m for m in METRICS if any(e.get(m) is not None for e in ex)]
        ratios = _ratio_keys(ex)
        header = ["case", "mean ms", *metrics, *[r.replace("_", " ") for r in ratios], "device"]
        rows = []
        for b, e in zip(items, ex):
            case = b.get("param") or b["name"]
            rows.append([case, b["stats"]["mean"] * 1e3, *[e.get(m) for m in metrics],
                         *[e.get(r) for r in ratios], e.get("device")])
        out += [f"### {group}", "", table(header, rows), ""]
    return "\n".join(out)


def _gpu(v: dict, key: str) -> str:
    """``start -> end`` of a variant's gpu_start / gpu_end reading ``key``; '-' when unknown."""
    start, end = (v.get("gpu_start") or {}).get(key), (v.get("gpu_end") or {}).get(key)
    if start is None and end is None:
        return "-"
    return f"{fmt(start)} -> {fmt(end)}"


def render_train(data: dict, source: str) -> str:
    windows = data.get("windows") or 1
    out = [f"## {source}", "",
           f"- date: {data.get('datetime', '?')}",
           f"- device: {data.get('device', '?')}",
           f"- torch {data.get('torch', '?')}, triton {data.get('triton') or '-'}",
           f"- preset {data.get('preset')}, batch {data.get('batch')}, "
           + (f"{windows} windows of {data.get('steps')} timed steps (images/s: the median window's)"
              if windows > 1 else f"{data.get('steps')} timed steps")
           + f" after {data.get('warmup')} warm-up steps, model {fmt(data.get('GFLOP/image'))} GFLOP/image "
           "(forward + backward)", ""]
    cols = ["images/s", "ms/step", "peak_mem_mb", "images/s_min", "images/s_max", "TFLOP/s", "fraction_of_peak",
            "ratio_vs_baseline_fp32", "ratio_vs_baseline_strong", "ratio_vs_baseline_amp_compile", "loss",
            "warmup_s", "graphs", "graph_breaks"]
    variants = data.get("variants", [])
    cols = [c for c in cols if c in ("images/s", "ms/step", "peak_mem_mb") or any(v.get(c) is not None for v in variants)]
    gpu = any(value is not None for v in variants for k in ("gpu_start", "gpu_end") for value in (v.get(k) or {}).values())
    rows = [[v["variant"], v.get("precision"), v.get("compile"), *[v.get(c) for c in cols],
             *([_gpu(v, "sm_clock_mhz"), _gpu(v, "temperature_c")] if gpu else [])] for v in variants]
    header = ["variant", "precision", "compile", *[c.replace("_", " ") for c in cols],
              *(["SM MHz", "temp C"] if gpu else [])]
    header = [h.replace("warmup s", "warm-up s (compile)").replace("peak mem mb", "peak mem MiB") for h in header]
    out += [table(header, rows), ""]
    for line in data.get("goal", []):
        out.append(f"- {line}")
    return "\n".join(out + [""])


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def render_profile(data: dict, source: str, top: int | None = None) -> str:
    """A profile digest: GPU time per category, then the costliest kernels (``top`` of them)."""
    title = f"profile of {data.get('variant', '?')}" + (f" ({source})" if source else "")
    out = [f"## {title}", "",
           f"- device: {data.get('device', '?')}, torch {data.get('torch', '?')}, triton {data.get('triton') or '-'}; "
           f"preset {data.get('preset', '?')}, batch {data.get('batch', '?')}; {data.get('steps')} profiled steps "
           f"(trace: {data.get('trace', '-')}, {data.get('trace_kept', '-')})",
           f"- per step: GPU span {fmt(data.get('span_ms/step'))} ms, kernels busy {fmt(data.get('busy_ms/step'))} ms, "
           f"idle gaps {fmt(data.get('idle_ms/step'))} ms; {data.get('gpu_events', 0)} GPU events, "
           f"{data.get('distinct_kernels', 0)} distinct kernels", ""]
    if data.get("note"):
        out += [f"- {data['note']}", ""]
    if not data.get("gpu_events"):
        return "\n".join(out)
    cats = [[c["category"], c["ms/step"], c["fraction"]] for c in data.get("categories", [])]
    out += [table(["category", "ms/step", "fraction of span"], cats), ""]
    kernels = data.get("kernels", [])[:top] if top is not None else data.get("kernels", [])
    if kernels:
        rows = [[i + 1, _short(k["name"]), k["category"], k["calls/step"], k["ms/step"], k["fraction_of_busy"]]
                for i, k in enumerate(kernels)]
        out += [table(["#", "kernel", "category", "calls/step", "ms/step", "fraction of busy"], rows), ""]
    return "\n".join(out)


def render(data: dict, source: str, brief: bool = False) -> str:
    if data.get("kind") == "profile_digest":
        return render_profile(data, source, top=5 if brief else None)
    if "variants" in data:
        return render_train(data, source)
    if "benchmarks" in data:
        return render_pytest(data, source)
    raise ValueError(f"{source}: neither a pytest-benchmark JSON ('benchmarks'), a train_throughput JSON "
                     "('variants') nor a profile digest ('kind': 'profile_digest')")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path,
                        help="--benchmark-json files, train_throughput JSON and/or profile digests")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    parser.add_argument("--title", default="Benchmarks")
    parser.add_argument("--brief", action="store_true", help="profile digests: category table and top 5 kernels only")
    args = parser.parse_args(argv)
    parts = [f"# {args.title}", ""]
    for path in args.files:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"cannot read {path}: {e}")
        parts.append(render(data, path.name, brief=args.brief))
    text = "\n".join(parts)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
