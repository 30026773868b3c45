"""Joint-training throughput of each variant over N steps (the measurement of benchmarks/gpu_check).

    python benchmarks/train_throughput.py --preset cifar10 --batch 256 --steps 200 --out train.json

Synthetic dataset-shaped data on the device; per variant (see train_bench.py) a fresh model in the
trainer's own ``TrainStep``, ``--warmup`` steps (compilation included: the JSON's ``warmup_s``)
left out, then ``--windows`` windows of ``--steps`` timed steps (CUDA events on a GPU; the median
window's images/s, with min and max), peak memory of the timed steps, the GPU's SM clock and
temperature before and after the windows, and Dynamo's graph / graph-break counts and the compile
caches' hits. ``--profile-steps N`` then records N steps with torch.profiler (gzipped chrome trace
and a digest of the GPU kernels: benchmarks/profile_digest.py). ``--load-cache`` / ``--save-cache``
carry Inductor's compiled artifacts between runs (benchmarks/compile_cache.py). ``--out`` is
rewritten after each variant, so a run stopped by a time limit keeps the variants it finished;
a run stopped by SIGINT still saves its compile cache. Prints a markdown table and, for the CIFAR
preset at batch 256 on a GPU, the issue's goal checks (>= 5,000 images/s, >= 1.3x the strong
plain-PyTorch baseline ``baseline_strong``, lower peak memory; the ratio to the compiled AMP
baseline beside). Exits non-zero on a non-finite loss; a missed goal is reported, not an error.
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

import compile_cache
import profile_digest
import report
import train_bench as tb
from jdm_fast.training.config import COMPILE_MODES

GOAL_IMAGES_PER_S = 5000.0
GOAL_RATIO = 1.3
DEFAULT_VARIANTS = ("baseline_fp32", "baseline_amp", "baseline_amp_compile", "baseline_strong", "engine")


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
    other = results.get(tb.COMPILE_BASELINE)
    if other is not None:
        lines.append(f"engine vs {tb.COMPILE_BASELINE} (the goal's baseline before {tb.GOAL_BASELINE}): "
                     f"{engine['images/s'] / other['images/s']:.2f}x")
    return lines


RATIO_BASELINES = (tb.BASELINE, tb.GOAL_BASELINE, tb.COMPILE_BASELINE)


def _summary(meta: dict, results: dict[str, dict]) -> dict:
    """The JSON of a run: ``meta`` (device, versions, preset, batch, steps...) + the variants with
    their ratios to the baselines measured in the same run (to baseline_fp32: every variant; to
    the strong and the compiled AMP baselines: the engine variants), and the GPU goals where they
    apply."""
    for variant, r in results.items():
        for name in RATIO_BASELINES:
            base = results.get(name)
            wanted = name == tb.BASELINE or tb.is_engine(variant)
            r[f"ratio_vs_{name}"] = r["images/s"] / base["images/s"] if base and wanted else None
    goals = (meta["preset"], meta["batch"], meta["device"].startswith("cpu")) == ("cifar10", 256, False)
    return {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **meta,
            "variants": list(results.values()), "goal": goal_lines(results) if goals else []}


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout_s:.0f} s")
        time.sleep(0.2)


def merge(paths: list[Path], out: Path | None) -> int:
    """One table from runs of single variants in separate processes (``--hold``): same device,
    preset and batch required; ratios recomputed across them."""
    runs = [json.loads(p.read_text()) for p in paths if p.exists() and p.stat().st_size]
    if not runs:
        print(f"nothing to merge: none of {[str(p) for p in paths]} holds results", file=sys.stderr)
        return 1
    keys = ("device", "preset", "batch", "steps", "windows", "torch")
    for r in runs[1:]:
        if any(r.get(k) != runs[0].get(k) for k in keys):
            raise SystemExit(f"--merge: runs differ in {[k for k in keys if r.get(k) != runs[0].get(k)]}")
    meta = {k: v for k, v in runs[0].items() if k not in ("datetime", "variants", "goal")}
    results = {v["variant"]: v for r in runs for v in r["variants"]}
    data = _summary(meta, results)
    if out:
        out.write_text(json.dumps(data, indent=2))
    print(report.render_train(data, "training throughput"))
    return 0


def compile_stats() -> dict:
    """Dynamo's and the compile caches' counters since the last ``counters.clear()``."""
    from torch._dynamo.utils import counters
    inductor, aot = counters.get("inductor", {}), counters.get("aot_autograd", {})
    return {"graphs": counters.get("stats", {}).get("unique_graphs", 0),
            "graph_breaks": sum(counters.get("graph_break", {}).values()),
            "fxgraph_cache_hit": inductor.get("fxgraph_cache_hit", 0),
            "fxgraph_cache_miss": inductor.get("fxgraph_cache_miss", 0),
            "autograd_cache_hit": aot.get("autograd_cache_hit", 0),
            "autograd_cache_miss": aot.get("autograd_cache_miss", 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200, help="timed steps per window")
    p.add_argument("--windows", type=int, default=1, help="timed windows (median, min, max images/s)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset of " + ",".join(tb.VARIANTS))
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the results as JSON here, after each variant (report.py renders it)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing, profile this many steps of each variant: DIR/trace_<variant>.json.gz and the "
                        "digest DIR/profile_<variant>.json (DIR: --profile-dir)")
    p.add_argument("--profile-dir", type=Path, help="where the traces and digests go (default: --out's folder, or .)")
    p.add_argument("--load-cache", type=Path, metavar="FILE",
                   help="load Inductor's compiled artifacts from FILE before compiling (benchmarks/compile_cache.py)")
    p.add_argument("--save-cache", type=Path, metavar="FILE",
                   help="after each compiled variant (and on SIGINT), save this process's compiled artifacts into "
                        "FILE as the entry named after --variants")
    p.add_argument("--hold", type=Path, metavar="DIR",
                   help="after each variant's warm-up (compilation), write DIR/<variant>.ready and time its steps "
                        "only once DIR/<variant>.go exists: compile in parallel with other work, time alone")
    p.add_argument("--hold-timeout", type=float, default=600.0, help="seconds to wait for the go file")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="instead of measuring: merge these result files (one variant each) into --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in tb.VARIANTS]
    if bad or args.steps < 1 or args.warmup < 1 or args.batch < 2 or args.windows < 1 or args.profile_steps < 0:
        p.error(f"unknown variants {bad}" if bad else
                "--steps, --windows and --warmup must be >= 1, --batch >= 2, --profile-steps >= 0")
    device = torch.device(args.device)
    if args.load_cache or args.save_cache:
        print(compile_cache.load(args.load_cache) if args.load_cache else "compile cache: none given", flush=True)
    try:
        return _run(args, variants, device)
    except KeyboardInterrupt:  # gpu_check's time cap: keep what compiled so far for the next run
        if args.save_cache and any(v in tb.COMPILED for v in variants):
            print(compile_cache.save(args.save_cache, "+".join(variants)), flush=True)
        raise


def _run(args, variants: list[str], device: torch.device) -> int:
    name = tb.device_name(device)
    flops = tb.flops_per_image(args.preset, device)
    print(f"{name} | torch {torch.__version__} | {args.preset} batch {args.batch} | "
          f"{flops / 1e9:.2f} GFLOP/image (fwd+bwd)", flush=True)
    meta = {"device": name, **tb.versions(), "preset": args.preset, "batch": args.batch, "steps": args.steps,
            "windows": args.windows, "warmup": args.warmup, "compile_mode": args.compile_mode,
            "GFLOP/image": flops / 1e9}
    x, y = tb.synthetic_batch(args.preset, args.batch, device)
    profile_dir = args.profile_dir or (args.out.parent if args.out else Path("."))
    results: dict[str, dict] = {}
    failed = []
    for variant in variants:
        from torch._dynamo.utils import counters
        counters.clear()
        tb.reset_memory(device)
        with tb.settings(variant, device):
            start = time.perf_counter()
            model, precision, compile = tb.build(variant, args.preset, device)
            step = tb.make_step(model, precision, compile, args.preset, keyed=tb.is_engine(variant),
                                compile_mode=args.compile_mode, channels_last=tb.channels_last(variant),
                                channels_last_input=tb.channels_last_input(variant))
            wait = None
            if args.hold:
                def wait(variant=variant):
                    args.hold.mkdir(parents=True, exist_ok=True)
                    (args.hold / f"{variant}.ready").write_text(f"{time.perf_counter() - start:.1f}\n")
                    print(f"  {variant}: warmed up in {time.perf_counter() - start:.0f} s; waiting for "
                          f"{args.hold / (variant + '.go')}", flush=True)
                    _wait_for(args.hold / f"{variant}.go", args.hold_timeout)
            r = tb.measure(step, x, y, args.steps, args.warmup, device, before_timing=wait, windows=args.windows)
            r.update(variant=variant, precision=precision.name, compile=compile, step=step.trainer.describe(),
                     layout="channels-last" if tb.channels_last(variant) else "NCHW",
                     cudnn_benchmark=torch.backends.cudnn.benchmark, **compile_stats(),
                     **tb.achieved(flops, r["images/s"], name, precision))
            if args.save_cache and compile:
                print("  " + compile_cache.save(args.save_cache, "+".join(variants)), flush=True)
            if args.profile_steps:
                profile_dir.mkdir(parents=True, exist_ok=True)
                digest = profile_digest.record(step, x, y, args.profile_steps, device,
                                               profile_dir / f"trace_{variant}.json.gz")
                digest.update(variant=variant, device=name, **tb.versions(), preset=args.preset, batch=args.batch)
                (profile_dir / f"profile_{variant}.json").write_text(json.dumps(digest, indent=2))
                r["profile"] = f"profile_{variant}.json"
                print(f"  {variant}: profiled {args.profile_steps} steps -> {profile_dir / digest['trace']} "
                      f"({digest['trace_mib']:.1f} MiB, {digest['trace_kept']}); GPU busy "
                      f"{digest['busy_ms/step']:.1f} of {digest['span_ms/step']:.1f} ms/step", flush=True)
        results[variant] = r
        if not math.isfinite(r["loss"]):
            failed.append(variant)
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f}"
        print(f"  {variant}: {r['images/s']:,.1f} images/s (median of {args.windows}; {r['images/s_min']:,.1f}-"
              f"{r['images/s_max']:,.1f}), {r['ms/step']:.1f} ms/step, peak {peak} MiB, loss {r['loss']:.4f} "
              f"(warm-up incl. compilation {r['warmup_s']:.0f} s, {r['graphs']} graphs, {r['graph_breaks']} graph "
              f"breaks, FX graph cache {r['fxgraph_cache_hit']} hits / {r['fxgraph_cache_miss']} misses; "
              f"{r['step']})", flush=True)
        if args.out:  # after every variant, so a time limit still leaves the finished ones
            args.out.write_text(json.dumps(_summary(meta, results), indent=2))
        del model, step
        torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next variant
    print(report.render_train(_summary(meta, results), "training throughput"))
    if failed:
        print(f"ERROR: non-finite loss in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
