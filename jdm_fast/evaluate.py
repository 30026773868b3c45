"""Evaluate a trained joint model: ``python -m jdm_fast.evaluate --checkpoint runs/digits/checkpoint.pt``.

Reports (printed table + JSON, default ``<checkpoint folder>/eval.json``):
- test accuracy of the head with the raw and the EMA weights (t = 0, eval mode);
- FID and improved precision/recall (k = 3) of ``--num`` unconditional and conditional samples
  against the test split, in the space of a feature extractor that every number names:
  ``FID[inception-v3]`` with ``--inception-weights PATH`` (torchvision Inception-v3 state dict,
  never downloaded), else ``FID[<dataset>-features]``: a small CNN the project trains on the train
  split (cached as ``<checkpoint folder>/feature_classifier.pt``); such numbers are NOT
  comparable to published FID;
- class consistency: the fraction of conditional samples that each *judge* reads as their target
  class (``class_consistency[<judge>]``), overall and per target class (``per_class``, with each
  judge's confusion counts), and each judge's own accuracy on the real test split (``judges``).
  The judges are independent classifiers of different families trained on the train split
  (``--judges``, default every one that can run): ``cnn`` (the feature classifier above,
  ``class_consistency[<dataset>-features]``), ``knn`` (5-NN on raw pixels) and ``svm`` (an RBF SVM
  on pixels; fitting it needs scikit-learn: ``pip install 'jdm_fast[eval]'``; without it the svm
  judge is skipped and the results say so). The pixel judges are cached next to the feature
  classifier (``judge_knn.safetensors``, ``judge_svm.safetensors``; data only).
``--samples samples.npz`` (from ``python -m jdm_fast.sample``) evaluates those images instead of
generating; its labels >= 0 are the targets for class consistency. A counterfactual file
(``--mode counterfactual``) is judged per ``t_start``/``alpha`` setting, each with the fraction
the model's own head reads as the target (``head_reads_target``) next to the judges'.
Generated conditional samples (``--modes``: ``guided`` by default on a head also trained on x_t,
the digits preset, else ``cond``; each with ``python -m jdm_fast.sample``'s defaults) take the sampler's ``--purify``, ``--retries``/``--recheck``/``--accept``
and ``--amp``.

A model trained with ``--objective diffusion`` (no head) gets no test accuracy and no conditional
samples; one trained with ``--objective classifier`` (no decoder) gets test accuracy only
(``--samples`` is refused for it). ``--modes`` picks which sample sets to generate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jdm_fast.data.images import to_uint8
from jdm_fast.generation import SampleSettings, balanced_labels, default_head_input, generate, load_joint_model
from jdm_fast.generation.loading import file_kind
from jdm_fast.metrics import (
    FEATURE_CLASSIFIER_NAME,
    JUDGE_IDS,
    InceptionFeatures,
    class_agreement,
    feature_statistics,
    frechet_distance,
    get_feature_classifier,
    get_judges,
    judge_report,
    knn_radii,
    plan_judges,
    precision_recall,
)
from jdm_fast.training.config import check_device
from jdm_fast.training.precision import amp_dtype


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jdm_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (raw and EMA weights are evaluated) or "
                   "a safetensors export (the one set it holds)")
    p.add_argument("--num", type=int, default=500, help="samples per mode (uncond, cond) for FID/precision/recall")
    p.add_argument("--samples", help="evaluate the images of this samples.npz instead of generating")
    p.add_argument("--modes", nargs="+", choices=("uncond", "cond", "guided"),
                   help="sample sets to generate (those the model can make: no cond or guided without a head); "
                        "default: uncond and, on a head also trained on x_t (the digits preset), guided, else cond")
    p.add_argument("--cond-num", type=int, help="conditional samples (default --num; steering costs ~20x an "
                   "unconditional sample)")
    p.add_argument("--steps", type=int, default=50, help="reverse steps of the generated samples (each mode's "
                   "default sampler, as python -m jdm_fast.sample)")
    p.add_argument("--alpha", type=float, default=SampleSettings().alpha,
                   help="representation step of the cond samples (normalised; see python -m jdm_fast.sample -h)")
    p.add_argument("--purify", type=float, default=SampleSettings().purify,
                   help="cond samples: re-noise to this fraction of T and denoise unsteered (see python -m jdm_fast.sample -h)")
    p.add_argument("--retries", type=int, default=SampleSettings().retries,
                   help="cond samples: redraw rounds for samples the head is unsure of (see python -m jdm_fast.sample -h)")
    p.add_argument("--recheck", type=int, default=SampleSettings().recheck,
                   help="cond samples: re-purified copies the redraw decision also reads (see python -m jdm_fast.sample -h)")
    p.add_argument("--accept", type=float, default=SampleSettings().accept,
                   help="cond samples: head confidence that needs no redraw (with --retries)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="generate under bf16 autocast where the hardware has fast bf16 (default on; see python -m "
                        "jdm_fast.sample -h)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="sample from the EMA (default) or raw weights")
    p.add_argument("--inception-weights", help="torchvision Inception-v3 weights file (never downloaded)")
    p.add_argument("--feature-classifier", help=f"cached feature classifier (default <checkpoint folder>/"
                   f"{FEATURE_CLASSIFIER_NAME}; trained on demand)")
    p.add_argument("--train-feature-classifier", action="store_true", help="(re)train the feature classifier")
    p.add_argument("--judges", nargs="+", choices=JUDGE_IDS, help="classifiers that judge the class of "
                   "labelled samples (default: every one that can run here; naming svm without scikit-learn "
                   "is an error)")
    p.add_argument("--train-judges", action="store_true", help="(re)fit the cached knn/svm judges")
    p.add_argument("--k", type=int, default=3, help="neighbours of precision/recall")
    p.add_argument("--data-dir", help="where the model's dataset lives now (default: the path in the checkpoint)")
    p.add_argument("--out", help="JSON results (default <checkpoint folder>/eval.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


class _RealSet:
    """The test split's features and what every generated set is compared with: their Gaussian
    statistics and k-NN radii, computed once."""

    def __init__(self, features: np.ndarray, k: int):
        self.features, self.k = features, k
        self.stats = feature_statistics(features)
        self.radii = knn_radii(torch.as_tensor(features, dtype=torch.float64), k)


def _quality(extractor, real: _RealSet, images: np.ndarray) -> dict:
    feats = extractor.features(images)
    prec, rec = precision_recall(real.features, feats, k=real.k, real_radii=real.radii)
    fid = frechet_distance(*real.stats, *feature_statistics(feats))
    return {f"FID[{extractor.name}]": fid, f"precision[{extractor.name}]": prec,
            f"recall[{extractor.name}]": rec, "num": int(len(images))}


def run(args: argparse.Namespace, log=print) -> dict:
    from jdm_fast.data import load_dataset
    from jdm_fast.training.evaluation import test_accuracy

    # Everything that can be checked before the work is checked first (nothing is lost at the end).
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.num <= args.k:
        raise ValueError(f"--num {args.num} must exceed --k {args.k} (each sample needs k neighbours among the others)")
    cond_num = args.num if args.cond_num is None else args.cond_num
    if cond_num <= args.k:
        raise ValueError(f"--cond-num {cond_num} must exceed --k {args.k}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.alpha) or args.alpha < 0:
        raise ValueError(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if not 0.0 <= args.purify < 1.0:
        raise ValueError(f"--purify must lie in [0, 1) (a fraction of T), got {args.purify}")
    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    if args.recheck < 0 or (args.recheck and not args.purify):
        raise ValueError(f"--recheck must be >= 0 and needs --purify > 0, got --recheck {args.recheck} "
                         f"--purify {args.purify}")
    if not 0.0 <= args.accept <= 1.0:
        raise ValueError(f"--accept must lie in [0, 1] (a probability), got {args.accept}")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"--checkpoint: no checkpoint at {ckpt}")
    out = Path(args.out) if args.out else ckpt.parent / "eval.json"
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give the JSON file to write")
    fc_path = Path(args.feature_classifier or ckpt.parent / FEATURE_CLASSIFIER_NAME)
    judge_ids, judges_skipped = plan_judges(args.judges, fc_path.parent, args.train_judges)
    device = check_device(args.device)
    start = time.perf_counter()
    # A training checkpoint holds raw and EMA weights; a safetensors export one set, which it names.
    if file_kind(ckpt) == "safetensors":
        only = load_joint_model(ckpt, device=device)
        loaded = {only.weights: only}
    else:
        loaded = {"raw": load_joint_model(ckpt, ema=False, device=device),
                  "ema": load_joint_model(ckpt, ema=True, device=device)}
    raw = next(iter(loaded.values()))  # config, dataset and step are the same in both
    T = raw.model.diffusion.num_timesteps
    if not args.samples and raw.model.config.generates and args.steps > T:  # as sample refuses it (was clamped)
        raise ValueError(f"--steps {args.steps} exceeds the model's {T} diffusion steps (use at most {T})")
    data_dir = args.data_dir or raw.data_dir
    test = load_dataset(raw.dataset, "test", data_dir)
    results: dict = {"checkpoint": str(ckpt), "step": raw.step, "dataset": raw.dataset, "objective": raw.objective}
    if args.samples:  # a classifier-only model makes no samples: nothing to compare them with
        raw.require("generate", "--samples (evaluating a model's samples)")
    if raw.model.config.classifies:
        for which, lm in loaded.items():
            results[f"test_accuracy_{which}"] = test_accuracy(lm.model, test, device)
    else:
        log(f"no test accuracy: {ckpt} was trained with --objective {raw.objective} (no classifier head)")
    fc = get_feature_classifier(fc_path, raw.dataset, data_dir, retrain=args.train_feature_classifier,
                                device=str(device), log=log)
    results["feature_classifier"] = {k: fc.info.get(k) for k in ("test_accuracy", "seed", "steps")}
    extractor = InceptionFeatures(args.inception_weights, device=str(device)) if args.inception_weights else fc
    results["feature_extractor"] = extractor.name
    real = _RealSet(extractor.features(test.images), args.k)

    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sample_seconds: dict[str, float] = {}
    head_reads: dict[str, float] = {}  # the model's own head: fraction read as the target
    if args.samples:
        path = Path(args.samples)
        if not path.is_file():
            raise FileNotFoundError(f"--samples: no file at {path}")
        data = np.load(path)
        if "images" not in data or "labels" not in data:
            raise ValueError(f"{path} lacks 'images' and 'labels' (write it with python -m jdm_fast.sample)")
        u = raw.model.unet.config
        want = (u.image_size, u.image_size, u.in_channels)
        if data["images"].ndim != 4 or data["images"].shape[1:] != want:
            raise ValueError(f"--samples {path} holds images of shape {data['images'].shape[1:]} (N, H, W, C) but the "
                             f"model makes {want}")
        if data["labels"].shape != (len(data["images"]),) or (data["labels"] >= test.num_classes).any():
            raise ValueError(f"--samples {path}: 'labels' must hold one class id < {test.num_classes} (or -1) per image")
        if {"t_start", "alpha", "probs_after"} <= set(data.files):
            # counterfactuals (python -m jdm_fast.sample --mode counterfactual): one set per setting,
            # with the head's own reading of each counterfactual next to the judges'
            for t, a in sorted({(float(t), float(a)) for t, a in zip(data["t_start"], data["alpha"])}):
                rows = (data["t_start"] == t) & (data["alpha"] == a)
                name = f"counterfactual t_start={t:g} alpha={a:g}"
                sets[name] = (data["images"][rows], data["labels"][rows])
                head_reads[name] = float((data["probs_after"][rows].argmax(axis=1) == data["labels"][rows]).mean())
        else:
            sets["samples"] = (data["images"], data["labels"])
    elif not raw.model.config.generates:
        log(f"no samples: {ckpt} was trained with --objective {raw.objective} (no decoder)")
    else:
        want = "ema" if args.ema else "raw"
        if want not in loaded:
            raise ValueError(f"--{'ema' if args.ema else 'raw'}: {ckpt} holds only the {raw.weights} weights "
                             f"(pass --{'no-ema' if args.ema else 'ema'}, or the training checkpoint)")
        lm = loaded[want]
        k = lm.num_classes
        amp, why = amp_dtype(args.amp, device)
        log(f"generating in {amp or 'fp32'}: {why}")
        noise_aware = lm.model.config.noise_aware_head
        settings = SampleSettings(steps=args.steps, alpha=args.alpha, retries=args.retries, accept=args.accept,
                                  amp=amp, purify=args.purify, recheck=args.recheck)
        results["precision"] = amp or "fp32"
        asked = args.modes or ["uncond", "guided" if noise_aware else "cond"]
        modes = [m for m in asked if m == "uncond" or lm.model.config.classifies]
        if len(modes) < len(asked):
            log(f"no conditional samples: {ckpt} was trained with --objective {raw.objective} (no classifier head)")
        for mode in modes:
            num = args.num if mode == "uncond" else cond_num
            labels = None if mode == "uncond" else balanced_labels(num, k)
            t0 = time.perf_counter()
            # the head input python -m jdm_fast.sample defaults to (x_t for guided on a noise-aware head)
            s = dataclasses.replace(settings, head_input=default_head_input(mode, noise_aware))
            x = generate(lm.model, mode, num, labels, s, torch.Generator(device=device).manual_seed(args.seed),
                         device, augment=lm.augment)
            seconds = time.perf_counter() - t0
            log(f"generated {num} {mode} samples in {seconds:.1f}s")
            sets[mode] = (to_uint8(x), np.full(num, -1) if labels is None else labels.numpy())
            sample_seconds[mode] = seconds
    judges = []
    if any((labels >= 0).any() for _, labels in sets.values()):
        judges = get_judges(judge_ids, fc_path.parent, raw.dataset, data_dir, cnn=fc, retrain=args.train_judges, log=log)
        results["judges"] = judge_report(judges, test.images, test.labels, test.num_classes)
        for kind, why in judges_skipped.items():
            log(f"judge {kind} skipped: {why}")
        if judges_skipped:
            results["judges_skipped"] = judges_skipped
    for name, (images, labels) in sets.items():
        if len(images) > args.k:
            entry = _quality(extractor, real, images)
        else:  # too few for k-NN precision/recall (a small counterfactual setting)
            entry = {"num": int(len(images))}
        if name in sample_seconds:
            entry["seconds"] = sample_seconds[name]
        if name in head_reads:
            entry["head_reads_target"] = head_reads[name]
        has = labels >= 0
        if has.any():
            agreement = class_agreement({j.name: j.predict(images[has]) for j in judges}, labels[has], test.num_classes)
            for judge, value in agreement["overall"].items():
                entry[f"class_consistency[{judge}]"] = value
            entry["per_class"], entry["confusion"] = agreement["per_class"], agreement["confusion"]
        results[name] = entry
    results["seconds"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(format_table(results))
    log(f"wrote {out}")
    return results


def format_table(results: dict) -> str:
    lines = [f"{'metric':<42} {'value':>10}", "-" * 53]
    lines += [f"{f'test accuracy ({label})':<42} {results[key]:>10.2%}"
              for key, label in (("test_accuracy_raw", "raw"), ("test_accuracy_ema", "EMA")) if key in results]
    for name, entry in results.items():
        if isinstance(entry, dict) and "num" in entry:
            for key, v in entry.items():
                if key != "num" and isinstance(v, (int, float)):
                    lines.append(f"{name + ' ' + key:<42} {v:>10.4g}")
    for name, judge in results.get("judges", {}).items():
        lines.append(f"{f'judge {name} test accuracy':<42} {judge['test_accuracy']:>10.2%}")
    for kind, why in results.get("judges_skipped", {}).items():
        lines.append(f"judge {kind} skipped: {why}")
    for name, entry in results.items():
        if isinstance(entry, dict) and "per_class" in entry:
            judges = list(entry["per_class"][0]["agreement"]) if entry["per_class"] else []
            lines += ["", f"{name}: how often each judge reads the target class",
                      f"{'class':>5} {'count':>6} " + " ".join(f"{j:>16}" for j in judges)]
            for row in entry["per_class"]:
                cells = ["-" if row["agreement"][j] is None else f"{row['agreement'][j]:.0%}" for j in judges]
                lines.append(f"{row['class']:>5} {row['count']:>6} " + " ".join(f"{c:>16}" for c in cells))
            total = sum(row["count"] for row in entry["per_class"])
            lines.append(f"{'all':>5} {total:>6} " + " ".join(
                f"{entry[f'class_consistency[{j}]']:>16.0%}" for j in judges))
            lines.append("")
    lines.append(f"(feature extractor: {results['feature_extractor']}; "
                 + ("comparable to published FID only with the standard Inception weights)"
                    if results["feature_extractor"] == "inception-v3" else "NOT comparable to published FID)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
