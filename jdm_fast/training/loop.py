"""The training loop: joint model, AdamW, EMA, AMP, optional torch.compile, atomic checkpoints,
metrics.jsonl, periodic evaluation and sample grids. The loop only knows ``JointDiffusion``'s
loss interface, never the diffusion formulation."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from jdm_fast.data import ImageDataset, apply_augment, default_augment, infinite_batches, load_dataset
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models.joint import JointDiffusion
from jdm_fast.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from jdm_fast.training.config import TrainConfig
from jdm_fast.training.ema import EMA
from jdm_fast.training.evaluation import preview_samples, test_accuracy
from jdm_fast.training.images import save_grid
from jdm_fast.training.precision import Precision, autocast, choose_precision


class NonFiniteLossError(RuntimeError):
    pass


# What a resumed run must share with the original one: the model, the diffusion, and everything
# the data order and labels derive from (the data position is (seed, step)).
_RESUME_MUST_MATCH = ("model", "schedule", "num_timesteps", "dataset", "seed", "batch_size",
                      "labelled_fraction", "augment")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def check_dataset(cfg: TrainConfig, ds: ImageDataset) -> None:
    u, h = cfg.model.unet, cfg.model.head
    if (ds.image_size, ds.channels) != (u.image_size, u.in_channels):
        raise ValueError(
            f"dataset {ds.name!r} has {ds.image_size}x{ds.image_size}x{ds.channels} images but preset "
            f"{cfg.preset!r} expects {u.image_size}x{u.image_size}x{u.in_channels}"
        )
    if ds.num_classes != h.num_classes:
        raise ValueError(f"dataset {ds.name!r} has {ds.num_classes} classes but preset {cfg.preset!r} "
                         f"has a {h.num_classes}-class head")


def keep_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Semi-supervised: keep ``fraction`` of the labels of every class (at least one), set the rest to -1."""
    if fraction >= 1.0:
        return labels
    rng = np.random.default_rng(seed)
    out = np.full_like(labels, -1)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep = rng.permutation(idx)[: max(1, round(fraction * len(idx)))]
        out[keep] = c
    return out


def build_model(cfg: TrainConfig, device: torch.device) -> JointDiffusion:
    diffusion = GaussianDiffusion(make_betas(cfg.schedule, cfg.num_timesteps)).to(device)
    augment = None
    if cfg.augment:
        aug_cfg = default_augment(cfg.dataset)
        augment = lambda x: apply_augment(x, aug_cfg)  # noqa: E731  (global RNG: restored on resume)
    return JointDiffusion(cfg.model, diffusion, augment).to(device)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise ValueError("--optimizer apex needs NVIDIA apex installed; use --optimizer adamw") from e
        return FusedAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process RSS)


def _probe_cpu_amp(model: JointDiffusion, x: torch.Tensor, y: torch.Tensor, precision: Precision, log) -> Precision:
    """Time forward+backward in fp32 and bf16 on a copy of the model; keep AMP only if it is faster."""
    probe = copy.deepcopy(model)
    times = {}
    with torch.random.fork_rng():
        for name, prec in (("fp32", Precision(None, False, "")), ("bf16", precision)) * 2:
            start = time.perf_counter()
            for _ in range(2):
                with autocast(x.device, prec):
                    probe(x, y).total.backward()
            times[name] = time.perf_counter() - start  # second round (warm) overwrites the first
    if times["bf16"] < times["fp32"]:
        return dataclasses.replace(precision, reason=f"{precision.reason}; probe: bf16 {times['bf16']:.2f}s "
                                                     f"vs fp32 {times['fp32']:.2f}s per 2 steps")
    log(f"AMP: bf16 was slower than fp32 on this CPU ({times['bf16']:.2f}s vs {times['fp32']:.2f}s "
        "per 2 steps): running fp32")
    return Precision(None, False, "fp32: bf16 autocast measured slower than fp32 on this CPU")


def _export_safetensors(model: torch.nn.Module, path: Path, cfg: TrainConfig) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": cfg.to_json()})


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training; returns the final metrics."""
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    if cfg.resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume in {out} (expected {ckpt_path})")
    if not cfg.resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    train_ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test_ds = load_dataset(cfg.dataset, "test", cfg.data_dir)
    check_dataset(cfg, train_ds)
    labels = keep_labels(train_ds.labels, cfg.labelled_fraction, cfg.seed)
    train_ds = dataclasses.replace(train_ds, labels=labels)
    if cfg.batch_size > len(train_ds):
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(train_ds)} training images")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model(cfg, device)
    optimizer = make_optimizer(cfg, model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    ema = EMA(model, cfg.ema_decay)
    precision = choose_precision(cfg.amp, device)
    start_step = 0
    if cfg.resume:
        state = load_checkpoint(ckpt_path)
        saved = TrainConfig(**state["config"])
        differ = [f for f in _RESUME_MUST_MATCH if getattr(saved, f) != getattr(cfg, f)]
        if differ:
            raise ValueError(f"--resume: the configuration differs from the one in {ckpt_path} in {differ}; "
                             "resume with the settings of the original run")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        precision = Precision(*state["precision"])
        set_rng_state(state["rng"])
        log(f"resumed from {ckpt_path} at step {start_step}")
    if start_step >= cfg.steps:
        log(f"nothing to do: the run is at step {start_step} >= --steps {cfg.steps}")
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    if cfg.resume and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    (out / "config.json").write_text(cfg.to_json())

    batches = infinite_batches(train_ds, cfg.batch_size, seed=cfg.seed, start_step=start_step,
                               backend=cfg.loader, device=device)
    if precision.dtype is not None and device.type == "cpu" and not cfg.resume:
        x, y = next(infinite_batches(train_ds, cfg.batch_size, seed=cfg.seed, device=device))
        precision = _probe_cpu_amp(model, x, y, precision, log)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    why = "asked" if cfg.compile is not None else ("default on CUDA" if use_compile else
                                                    "default off on CPU: compile time outweighs the gain; --compile to force")
    step_model = torch.compile(model) if use_compile else model  # `model` stays the checkpointed module
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device {device} | precision {precision.name}: {precision.reason} | compile {use_compile} ({why})")
    log(f"model {n_params / 1e6:.2f}M parameters (head input {model.head.in_features}) | data {train_ds.name}: "
        f"{len(train_ds)} train / {len(test_ds)} test | out {out}")

    metrics_path = out / "metrics.jsonl"

    def record(entry: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def save(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "config": dataclasses.asdict(cfg), "step": step, "model": model.state_dict(),
            "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "precision": (precision.dtype, precision.use_scaler, precision.reason),
            "rng": rng_state(), "data_position": {"seed": cfg.seed, "step": step},
        })

    def evaluate(step: int, final: bool = False) -> dict:
        acc_raw = test_accuracy(model, test_ds, device)
        acc_ema = test_accuracy(ema.model, test_ds, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            samples = preview_samples(ema.model, cfg.num_samples, cfg.sample_steps, cfg.seed, device, cfg.sampler)
        grid = save_grid(samples, out / ("samples_final.png" if final else f"samples_{step:07d}.png"))
        entry = {"kind": "eval", "step": step, "test_acc_raw": acc_raw, "test_acc_ema": acc_ema, "samples": str(grid)}
        record(entry)
        return entry

    model.train()
    sums = torch.zeros(5, device=device)  # total, diffusion, classifier, correct, labelled (no per-step sync)
    tick_start, tick_steps = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stdout,
               disable=None)
    for step in range(start_step, cfg.steps):
        x, y = next(batches)
        with autocast(device, precision):
            losses = step_model(x, y)
        scaler.scale(losses.total).backward()
        if cfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update(model, step)
        sums += torch.stack([losses.total.detach(), losses.diffusion.detach(), losses.classifier.detach(),
                             losses.correct.float(), losses.labelled.float()])
        tick_steps += 1
        done = step + 1
        bar.update(1)
        tick = done % cfg.log_every == 0 or done == cfg.steps
        if tick or done % cfg.save_every == 0:
            # One host sync per tick or save: nothing non-finite is ever logged as fine or saved.
            total, diff, cls, correct, labelled = (sums / tick_steps).tolist()
            if not all(math.isfinite(v) for v in (total, diff, cls)):
                raise NonFiniteLossError(
                    f"non-finite loss (total={total}, diffusion={diff}, classifier={cls}) in steps "
                    f"{done - tick_steps + 1}..{done}; last good checkpoint: {ckpt_path}")
        if tick:
            elapsed = time.perf_counter() - tick_start
            entry = {"kind": "train", "step": done, "loss": total, "diffusion": diff, "classifier": cls,
                     "train_acc": correct / labelled if labelled else None,
                     "img_per_s": tick_steps * cfg.batch_size / elapsed, "lr": scheduler.get_last_lr()[0],
                     "peak_mem_mb": _peak_memory_mb(device)}
            record(entry)
            bar.set_postfix(loss=f"{diff:.4f}", cls=f"{cls:.3f}",
                            acc="-" if entry["train_acc"] is None else f"{entry['train_acc']:.3f}",
                            img_s=f"{entry['img_per_s']:.0f}")
            sums.zero_()
            tick_start, tick_steps = time.perf_counter(), 0
        if done % cfg.save_every == 0 or done == cfg.steps:
            save(done)
        if done % cfg.eval_every == 0 and done != cfg.steps:
            eval_start = time.perf_counter()
            result = evaluate(done)
            tick_start += time.perf_counter() - eval_start  # keep evaluation out of images/s
            bar.write(f"step {done}: test accuracy raw {result['test_acc_raw']:.2%} | "
                      f"EMA {result['test_acc_ema']:.2%} | samples {result['samples']}")
    bar.close()
    final = evaluate(cfg.steps, final=True)
    _export_safetensors(model, out / "model.safetensors", cfg)
    _export_safetensors(ema.model, out / "model_ema.safetensors", cfg)
    log(f"final (step {cfg.steps}): test accuracy raw {final['test_acc_raw']:.2%} | EMA {final['test_acc_ema']:.2%}")
    log(f"wrote {ckpt_path}, {out / 'model.safetensors'}, {out / 'model_ema.safetensors'}, {final['samples']}, "
        f"{metrics_path}")
    return final
