"""Joint-training throughput of each variant over N steps (the measurement of benchmarks/gpu_check).

    python benchmarks/train_throughput.py --preset cifar10 --batch 256 --steps 200 --out train.json

Synthetic dataset-shaped data on the device; per variant (see train_bench.py) a fresh model and
AdamW, ``--warmup`` steps (compilation included) left out, then ``--steps`` timed steps (CUDA
events on a GPU), peak memory of the timed steps. Prints a markdown table and, for the CIFAR preset
at batch 256 on a GPU, the issue's goal checks (>= 5,000 images/s, >= 1.3x the compiled AMP
baseline, lower peak memory). Exits non-zero on a non-finite loss; a missed goal is reported, not
an error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

import report
import train_bench as tb

GOAL_IMAGES_PER_S = 5000.0
GOAL_RATIO = 1.3


def goal_lines(results: dict[str, dict]) -> list[str]:
    engine, base = results.get("engine"), results.get(tb.GOAL_BASELINE)
    if engine is None:
        return []
    ok = "met" if engine["images/s"] >= GOAL_IMAGES_PER_S else "MISSED"
    lines = [f"goal {GOAL_IMAGES_PER_S:,.0f} images/s: engine {engine['images/s']:,.0f} images/s ({ok})"]
    if base is not None:
        ratio = engine["images/s"] / base["images/s"]
        lines.append(f"goal >= {GOAL_RATIO}x {tb.GOAL_BASELINE}: {ratio:.2f}x "
                     f"({'met' if ratio >= GOAL_RATIO else 'MISSED'})")
        if engine["peak_mem_mb"] is not None and base["peak_mem_mb"] is not None:
            lower = engine["peak_mem_mb"] < base["peak_mem_mb"]
            lines.append(f"goal lower peak memory: engine {engine['peak_mem_mb']:,.0f} MiB vs "
                         f"{base['peak_mem_mb']:,.0f} MiB ({'met' if lower else 'MISSED'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--variants", default=",".join(tb.VARIANTS), help="comma-separated subset of " + ",".join(tb.VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the results as JSON here (report.py renders it)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in tb.VARIANTS]
    if bad or args.steps < 1 or args.warmup < 1 or args.batch < 2:
        p.error(f"unknown variants {bad}" if bad else "--steps and --warmup must be >= 1, --batch >= 2")
    device = torch.device(args.device)
    name = tb.device_name(device)
    flops = tb.flops_per_image(args.preset, device)
    print(f"{name} | torch {torch.__version__} | {args.preset} batch {args.batch} | "
          f"{flops / 1e9:.2f} GFLOP/image (fwd+bwd)", flush=True)
    x, y = tb.synthetic_batch(args.preset, args.batch, device)
    results: dict[str, dict] = {}
    failed = []
    for variant in variants:
        tb.reset_memory(device)
        start = time.perf_counter()
        model, precision, compile = tb.build(variant, args.preset, device)
        step = tb.make_step(model, precision, compile, device)
        r = tb.measure(step, x, y, args.steps, args.warmup, device)
        r.update(variant=variant, precision=precision.name, compile=compile, **tb.achieved(flops, r["images/s"], name,
                                                                                          precision))
        results[variant] = r
        if not math.isfinite(r["loss"]):
            failed.append(variant)
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f}"
        print(f"  {variant}: {r['images/s']:,.1f} images/s, {r['ms/step']:.1f} ms/step, peak {peak} MiB, "
              f"loss {r['loss']:.4f} ({time.perf_counter() - start:.0f} s with warm-up)", flush=True)
        del model, step
        torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next variant
    base, goal_base = results.get(tb.BASELINE), results.get(tb.GOAL_BASELINE)
    for variant, r in results.items():
        r["ratio_vs_baseline_fp32"] = r["images/s"] / base["images/s"] if base else None
        r["ratio_vs_baseline_amp_compile"] = (r["images/s"] / goal_base["images/s"]
                                              if goal_base and variant == "engine" else None)
    data = {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": name,
            **tb.versions(), "preset": args.preset, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "GFLOP/image": flops / 1e9, "variants": list(results.values()),
            "goal": goal_lines(results) if (args.preset, args.batch, device.type) == ("cifar10", 256, "cuda") else []}
    if args.out:
        args.out.write_text(json.dumps(data, indent=2))
    print(report.render_train(data, "training throughput"))
    if failed:
        print(f"ERROR: non-finite loss in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
