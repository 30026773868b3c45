"""The paper's comparison on one preset: joint vs diffusion-only vs classifier-only, and semi-supervised.

``python -m jdm_fast.experiments compare [--preset digits] [--seeds 0 1 2] [--steps N]
[--labelled-fractions 1.0 0.1 0.01] --out DIR``

For every seed it trains the diffusion-only model once (it reads no labels) and, at every
labelled fraction, the joint and the classifier-only model: the same architecture and the
preset's settings, changed only by ``--steps``, ``--seed``, ``--objective`` and
``--labelled-fraction``, through the trainer people run (``jdm_fast.training.loop.train``, with
``--amp`` unless ``--no-amp``). Each run is then evaluated with ``python -m jdm_fast.evaluate``'s
code: EMA test accuracy (joint, classifier-only), FID and precision/recall of ``--num``
unconditional samples (joint, diffusion-only) and the class consistency of ``--cond-num``
conditional samples (joint; evaluate's default conditional mode: guided on the digits preset's
noise-aware head, cond otherwise; ``cond_mode`` in the results), all in the space of one feature classifier trained once on the train
split (``DIR/feature_classifier.pt``; ``FID[<dataset>-features]``, not comparable to published FID).

Runs live in ``DIR/runs/<objective>_f<fraction>_s<seed>/``. A run whose ``result.json`` exists is
finished and is not redone; an interrupted one resumes from its checkpoint. ``DIR/compare.json``
holds every run's results and the summary, ``DIR/compare.md`` the table (mean +- std over seeds).
``--quick`` is a CI-sized smoke setting (few steps and samples; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from jdm_fast.checkpoint import atomic_write
from jdm_fast.models.joint import with_objective
from jdm_fast.training.config import PRESETS, TrainConfig, get_preset

QUICK = {"steps": 8, "seeds": [0], "labelled_fractions": [1.0, 0.1], "num": 16, "cond_num": 12, "sample_steps": 3}


@dataclass(frozen=True)
class RunSpec:
    objective: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.objective}_f{self.fraction:g}_s{self.seed}"


def plan(seeds: list[int], fractions: list[float]) -> list[RunSpec]:
    """Every run of the comparison, in the order they are trained (seed-major, so an early stop
    still leaves complete seeds)."""
    runs = []
    for seed in seeds:
        runs.append(RunSpec("diffusion", 1.0, seed))
        for fraction in fractions:
            runs += [RunSpec("joint", fraction, seed), RunSpec("classifier", fraction, seed)]
    return runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="digits", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="training steps of every run (the default fits the "
                   "digits comparison in 90 minutes on a 2-core CPU: README)")
    p.add_argument("--labelled-fractions", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    p.add_argument("--num", type=int, default=200, help="unconditional samples per generating run (FID, P/R)")
    p.add_argument("--cond-num", type=int, default=50, help="conditional samples per joint run (class consistency)")
    p.add_argument("--sample-steps", type=int, default=25, help="sampler steps of the evaluation samples")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="train with --amp")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--out", required=True, help="folder of the runs and of compare.md / compare.json")


def _check(args: argparse.Namespace) -> None:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    get_preset(args.preset)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    bad = [f for f in args.labelled_fractions if not 0 < f <= 1]
    if bad or not args.labelled_fractions or len(set(args.labelled_fractions)) != len(args.labelled_fractions):
        raise ValueError(f"--labelled-fractions must be distinct numbers in (0, 1], got {args.labelled_fractions}")
    if args.sample_steps < 1:
        raise ValueError(f"--sample-steps must be >= 1, got {args.sample_steps}")
    # evaluate's own checks (--num > k etc.) run before any training is spent
    _evaluate_args(args, Path("x"), Path(args.out), 0)


def _train_config(args: argparse.Namespace, spec: RunSpec, out: Path) -> TrainConfig:
    base = get_preset(args.preset)
    return dataclasses.replace(
        base, model=with_objective(base.model, spec.objective), steps=args.steps, seed=spec.seed,
        labelled_fraction=spec.fraction, out=str(out), amp=args.amp, device=args.device,
        eval_every=args.steps, save_every=min(base.save_every, args.steps), log_every=min(base.log_every, args.steps),
        num_samples=min(base.num_samples, 16), sample_steps=min(args.sample_steps, base.num_timesteps),  # preview grid
        warmup_steps=min(base.warmup_steps, max(0, args.steps - 1)), resume=(out / "checkpoint.pt").is_file())


def _evaluate_args(args: argparse.Namespace, checkpoint: Path, root: Path, seed: int) -> argparse.Namespace:
    from jdm_fast import evaluate

    ev = evaluate.parser().parse_args([
        "--checkpoint", str(checkpoint), "--num", str(args.num), "--cond-num", str(args.cond_num),
        "--steps", str(args.sample_steps), "--feature-classifier", str(root / "feature_classifier.pt"),
        "--out", str(checkpoint.parent / "eval.json"), "--seed", str(seed), "--device", args.device,
    ])
    if ev.num <= ev.k or ev.cond_num <= ev.k:
        raise ValueError(f"--num and --cond-num must exceed evaluate's k = {ev.k} neighbours")
    return ev


def _write_json(path: Path, data) -> None:
    blob = json.dumps(data, indent=2).encode()
    atomic_write(path, lambda f: f.write(blob))


def run_one(args: argparse.Namespace, spec: RunSpec, root: Path, log) -> dict:
    """Train and evaluate one run (or resume it); its result, also written to ``result.json``."""
    from jdm_fast import evaluate
    from jdm_fast.training.loop import train

    out = root / "runs" / spec.name
    cfg = _train_config(args, spec, out)
    t0 = time.perf_counter()
    lines: list[str] = []
    train(cfg, log=lines.append)
    train_seconds = time.perf_counter() - t0
    ev = evaluate.run(_evaluate_args(args, out / "checkpoint.pt", root, spec.seed), log=lines.append)
    fe = ev["feature_extractor"]
    result = {"objective": spec.objective, "labelled_fraction": spec.fraction, "seed": spec.seed,
              "steps": args.steps, "train_seconds": train_seconds, "eval_seconds": ev["seconds"],
              "test_acc_ema": ev.get("test_accuracy_ema"), "test_acc_raw": ev.get("test_accuracy_raw"),
              "feature_extractor": fe}
    if "uncond" in ev:
        result.update(fid=ev["uncond"][f"FID[{fe}]"], precision=ev["uncond"][f"precision[{fe}]"],
                      recall=ev["uncond"][f"recall[{fe}]"])
    cond_mode = next((m for m in ("guided", "cond") if m in ev), None)  # evaluate's conditional set
    if cond_mode:  # every judge's agreement in the JSON; the table's column is the feature classifier's
        judges = {k[len("class_consistency["):-1]: v for k, v in ev[cond_mode].items()
                  if k.startswith("class_consistency[")}
        result["cond_mode"] = cond_mode
        result["cond_consistency_by_judge"] = judges
        result["cond_consistency"] = judges.get(fe, next(iter(judges.values())))
    _write_json(out / "result.json", result)
    (out / "log.txt").write_text("\n".join(lines) + "\n")
    return result


METRICS = (("test_acc_ema", "EMA test acc", True), ("fid", "FID", False), ("precision", "precision", False),
           ("recall", "recall", False), ("cond_consistency", "cond. consistency", True),
           ("train_seconds", "train s", False))


def summarize(results: list[dict]) -> list[dict]:
    """One row per (objective, labelled fraction): mean, std (over seeds) and n of every metric."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["objective"], r["labelled_fraction"]), []).append(r)
    order = {"joint": 0, "classifier": 1, "diffusion": 2}
    rows = []
    for (objective, fraction), rs in sorted(groups.items(), key=lambda kv: (-kv[0][1], order[kv[0][0]])):
        row = {"objective": objective, "labelled_fraction": fraction, "seeds": sorted(r["seed"] for r in rs)}
        for key, _, _ in METRICS:
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                row[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
        rows.append(row)
    return rows


def _cell(stat: dict | None, percent: bool) -> str:
    if stat is None:
        return "-"
    if percent:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%"
    digits = 0 if stat["mean"] >= 100 else 3 if stat["mean"] < 1 else 1
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[dict], meta: dict) -> str:
    fe = meta["feature_extractor"]
    head = ["objective", "labels"] + [label.replace("FID", f"FID[{fe}]") for _, label, _ in METRICS]
    lines = [f"# Joint vs diffusion-only vs classifier-only: preset {meta['preset']}",
             "",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}; {meta['steps']} steps per run, "
             f"seeds {meta['seeds']}, --amp {meta['amp']}; {meta['num']} unconditional / {meta['cond_num']} "
             f"conditional samples per run, {meta['sample_steps']} sampler steps; training + evaluation "
             f"{meta['run_seconds'] / 60:.1f} min (this invocation's wall time {meta['wall_seconds'] / 60:.1f} min). "
             "Cells: mean ± std over seeds.",
             "",
             "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for row in rows:
        labels = "unused" if row["objective"] == "diffusion" else f"{100 * row['labelled_fraction']:g}%"
        cells = [row["objective"], labels] + [_cell(row.get(key), pct) for key, _, pct in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"FID[{fe}], precision and recall: the project's feature classifier, NOT comparable to "
              "published FID. Class consistency: the fraction of conditional samples (the model's own head "
              "steering) that this independent classifier reads as their target class."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, log=print) -> int:
    import torch

    _check(args)
    root = Path(args.out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file: give a folder")
    (root / "runs").mkdir(parents=True, exist_ok=True)
    runs = plan(args.seeds, args.labelled_fractions)
    start = time.perf_counter()
    results = []
    for i, spec in enumerate(runs, 1):
        done = root / "runs" / spec.name / "result.json"
        if done.is_file():
            result = json.loads(done.read_text())
            if result.get("steps") != args.steps:
                raise ValueError(f"{done} was trained for {result.get('steps')} steps, not --steps {args.steps}: "
                                 "use another --out (finished runs are never overwritten)")
            log(f"[{i}/{len(runs)}] {spec.name}: finished earlier ({done}), not redone")
        else:
            result = run_one(args, spec, root, log)
            parts = [f"train {result['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s"]
            if result["test_acc_ema"] is not None:
                parts.append(f"EMA test acc {result['test_acc_ema']:.2%}")
            if "fid" in result:
                parts.append(f"FID {result['fid']:.2f}")
            if "cond_consistency" in result:
                parts.append(f"cond consistency {result['cond_consistency']:.0%}")
            log(f"[{i}/{len(runs)}] {spec.name}: " + " | ".join(parts))
        results.append(result)
    rows = summarize(results)
    meta = {"preset": args.preset, "steps": args.steps, "seeds": args.seeds,
            "labelled_fractions": args.labelled_fractions, "amp": args.amp, "num": args.num,
            "cond_num": args.cond_num, "sample_steps": args.sample_steps,
            "feature_extractor": results[0]["feature_extractor"],
            "date": datetime.date.today().isoformat(), "machine": f"{_cpu()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "wall_seconds": time.perf_counter() - start,
            "run_seconds": sum(r["train_seconds"] + r["eval_seconds"] for r in results)}
    _write_json(root / "compare.json", {"meta": meta, "summary": rows, "runs": results})
    (root / "compare.md").write_text(markdown(rows, meta))
    log(markdown(rows, meta))
    log(f"wrote {root / 'compare.md'} and {root / 'compare.json'} ({meta['wall_seconds'] / 60:.1f} min)")
    return 0
