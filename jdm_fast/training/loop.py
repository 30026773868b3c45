"""The training loop: joint model, AdamW, EMA, AMP, optional torch.compile, data parallelism
(torchrun + DistributedDataParallel), crash-safe checkpoints with exact resume, metrics.jsonl,
periodic evaluation and sample grids. The loop only knows ``JointDiffusion``'s loss interface,
never the diffusion formulation.

Determinism contract. Step ``s`` trains on the global batch ``s`` of the data order (interleaved
shards, jdm_fast.data.loaders). What an example sees is drawn on the device from keys, never from
a process's RNG: the classifier input's augmentation of the example at position ``p`` of epoch
``e``'s order from ``(seed, e, p)`` (the loader's keyed draws, the same on every loader backend;
the diffusion term trains on the clean batch), and its timestep, noise and head-dropout masks from
``(seed, s, global example index)`` (``BatchKey``), and so are the UNet's dropout masks
(``unet.DropoutKey``); the loss terms are global means. So a run ends with the same weights (to
float rounding) whatever the number of processes, augmentation and dropout on or off. Nothing in
a step reads the global RNG; its state is still saved per process in every checkpoint, so a
resumed run repeats an uninterrupted one exactly. (Until the UNet's dropout was keyed, it drew
from each process's global RNG, seeded ``seed + rank``: a run resumed with another number of
processes drew fresh dropout streams. Until issue 17 the model augmented its classifier input
itself from the global RNG: augmented runs depended on the number of processes, and the
augmentation stream changed with issue 17.)

Non-finite losses. Every step runs through a GradScaler: dynamic for fp16, a fixed scale of 1 for
fp32/bf16 (exact: multiplying by 1), so a step whose gradients are non-finite is skipped instead of
poisoning the weights, without a per-step host sync on CUDA. Each step's loss is flagged on the
device; at every log tick or save the flags are read, the steps are reported, and
``max_nonfinite`` consecutive non-finite steps stop the run with :class:`NonFiniteLossError`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from jdm_fast.checkpoint import (CHECKPOINT_NAME, StorageError, atomic_write, check_weights, checkpoint_files,
                                 free_bytes, load_latest, remove_stale_temps, rng_state, save_checkpoint,
                                 set_rng_state, state_bytes, storage_error)
from jdm_fast.data import AugmentConfig, ImageDataset, default_augment, infinite_batches, load_dataset
from jdm_fast.data.images import save_grid
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models.joint import JointDiffusion
from jdm_fast.training import distributed
from jdm_fast.training.config import TrainConfig
from jdm_fast.training.distributed import Dist
from jdm_fast.training.evaluation import preview_samples, test_accuracy
from jdm_fast.training.precision import Precision, autocast, choose_precision
from jdm_fast.training.step import TrainStep
from jdm_fast.training.tensorboard import TensorBoardLog, require_tensorboard


class NonFiniteLossError(RuntimeError):
    """The run kept producing non-finite losses (``TrainConfig.max_nonfinite`` consecutive steps),
    or its weights became non-finite (then no checkpoint of them is written)."""


class Preempted(Exception):
    """SIGTERM, SIGINT or SIGUSR1 stopped the run after a step, whose checkpoint was written.
    ``exit_status`` is 128 + the signal number (the shell's convention: 143, 130, 138)."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint {path}; "
                         "continue with --resume")


PREEMPT_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s)


class _PreemptFlag:
    """Records a preemption signal; the loop stops after the step in progress (every process at the
    same step: under torchrun the flag is agreed over a CPU group at each step)."""

    def __init__(self, ctx: Dist):
        self.signum = 0
        self.ctx = ctx
        self._previous = {}
        self._group = None
        if ctx.enabled:  # a gloo group: agreeing costs no device sync, whatever the training backend
            self._group = torch.distributed.new_group(backend="gloo")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in PREEMPT_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        self.signum = signum

    def stop_signal(self) -> int:
        """The signal to stop on after this step (0: none); the same on every process."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag.item())


class _RunLock:
    """An exclusive lock on the run folder (``.lock``, held by rank 0 for the run's life): a second run
    on the same --out is refused, naming the holder; a lock left by a dead process is taken over.
    The operating system releases the lock when its process dies, however it dies."""

    def __init__(self, folder: Path, log):
        self.path = folder / ".lock"
        self.log = log
        self.file = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise FileExistsError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end "
                                  "or choose another --out") from None
        self.file.seek(0)
        previous = self.file.read().strip()
        if previous:
            self.log(f"note: took over the lock of a run that is no longer running ({previous})")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            self.file.close()


# What a resumed run must share with the original one: the model, the diffusion, and everything
# the data order and labels derive from (the data position is (seed, step)).
_RESUME_MUST_MATCH = ("model", "schedule", "num_timesteps", "dataset", "seed", "batch_size",
                      "labelled_fraction", "augment")


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
    """The joint model of ``cfg`` (its classifier-input augmentation comes from the loader)."""
    diffusion = GaussianDiffusion(make_betas(cfg.schedule, cfg.num_timesteps)).to(device)
    return JointDiffusion(cfg.model, diffusion).to(device)


def classifier_augment(cfg: TrainConfig) -> AugmentConfig | None:
    """The augmentation of the classifier input that the run's loader draws: the dataset's default
    (what ``jdm_fast.generation.load_joint_model`` reports as the head's training augmentation) with
    ``--augment`` and the classifier on clean images; None otherwise (on x_t nothing is augmented,
    and a diffusion-only model has no classifier)."""
    if cfg.augment and cfg.model.classifier_input in ("x0", "both") and cfg.model.classifies:
        return default_augment(cfg.dataset)
    return None


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


def export_safetensors(model: torch.nn.Module, path: Path, cfg: TrainConfig, weights: str, step: int,
                       **metadata: str) -> None:
    """The weights with the run's config, which weights they are ("raw" | "ema") and the step in the
    metadata (what ``jdm_fast.load_model`` reads), plus any extra ``metadata`` strings. Atomic, like
    checkpoints: a full disk leaves the previous export (or none), never a torn one."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors_bytes(tensors, metadata={"config": cfg.to_json(), "weights": weights, "step": str(step),
                                                **metadata})
    atomic_write(path, lambda f: f.write(data), size_hint=len(data))


# A checkpoint holds the model, its EMA copy and Adam's two moments (+ small state); while one is
# rotated in the run folder holds three (latest, previous, the one being written), and the run
# ends by exporting two safetensors copies of the weights.
_CHECKPOINTS_ON_DISK = 3


def _check_free_space(out: Path, model: torch.nn.Module, existing: list[Path]) -> None:
    """Refuse to start when the file system of ``out`` cannot hold the run's files."""
    state = model.state_dict()
    params = list(model.parameters())
    # torch.save adds ~320 bytes per tensor (zip headers, 64-byte alignment, pickle), safetensors ~100
    # (its JSON header); 64 kB covers the rest (config, RNG states, scheduler, scaler).
    weights = state_bytes(state) + 512 * len(state)
    moments = sum(p.numel() * p.element_size() + 512 for p in params)
    per_checkpoint = 2 * weights + 2 * moments + 65_536
    export = state_bytes(state) + 256 * len(state) + 65_536
    needed = max(0, _CHECKPOINTS_ON_DISK * per_checkpoint - sum(p.stat().st_size for p in existing)) + 2 * export
    free = free_bytes(out)
    if free is not None and free < needed:
        raise StorageError(
            f"not enough free space for the run in {out}: it needs about {needed / 1e6:,.1f} MB ({_CHECKPOINTS_ON_DISK} "
            f"checkpoints of ~{per_checkpoint / 1e6:,.1f} MB while one is rotated in, and 2 safetensors exports), "
            f"{free / 1e6:,.1f} MB are free. Free space or choose an --out on another disk")


def _quiet(*_args, **_kwargs) -> None:
    pass


class _NonFiniteGuard:
    """Flags each step's loss on the device (no sync) and, at each check, reports the non-finite
    steps and stops the run after ``limit`` consecutive ones."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0
        self.flags: list[torch.Tensor] = []
        self.first_step = 0  # 1-based number of the step of flags[0]

    def record(self, step: int, bad: torch.Tensor) -> None:
        if not self.flags:
            self.first_step = step + 1
        self.flags.append(bad)

    def check(self, ctx: Dist, precision: Precision, ckpt_path: Path, log) -> None:
        """Read the flags (a host sync; all processes take part) and report / stop."""
        if not self.flags:
            return
        flags = ctx.all_reduce_(torch.stack(self.flags).to(torch.int32)).tolist()
        self.flags = []
        bad = [self.first_step + i for i, f in enumerate(flags) if f]
        if not bad:
            self.streak = 0
            return
        trailing = next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))
        self.streak = self.streak + len(flags) if trailing == len(flags) else trailing
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        why = "the fp16 GradScaler skipped them" if precision.use_scaler else "skipped (weights unchanged)"
        log(f"warning: non-finite loss at step(s) {shown}: {why}")
        if self.streak >= self.limit:
            raise NonFiniteLossError(
                f"non-finite loss in the last {self.streak} consecutive steps (up to step {bad[-1]}; first "
                f"non-finite step of this stretch: {bad[-1] - self.streak + 1}); stopping instead of training on "
                f"(--max-nonfinite {self.limit}). Last good checkpoint: {ckpt_path if ckpt_path.exists() else 'none'}")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop what a killed run logged after the checkpoint (and a torn last line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training; returns the final metrics. Under torchrun (WORLD_SIZE > 1) every
    process calls this; only rank 0 logs and writes files."""
    if cfg.tensorboard:
        require_tensorboard()  # before anything starts: every process fails alike when it is missing
    ctx, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, device, log if ctx.is_main else _quiet)
    finally:
        ctx.close()


def _restore(cfg: TrainConfig, trainer: TrainStep, *, out: Path, ctx: Dist, log) -> tuple[int, Precision]:
    """Load the latest checkpoint of ``out`` into ``trainer`` (its model, EMA, optimizer, scheduler,
    scaler) and this process's RNG; returns (step, precision of the run)."""
    model, device = trainer.model, trainer.device
    state, path = load_latest(out, log)
    saved = TrainConfig(**state["config"])
    differ = [f for f in _RESUME_MUST_MATCH if getattr(saved, f) != getattr(cfg, f)]
    if differ:
        raise ValueError(f"--resume: the configuration differs from the one in {path} in {differ}; "
                         "resume with the settings of the original run")
    check_weights(state["model"], model.state_dict(), f"{path} (raw weights)")
    check_weights(state["ema"], trainer.ema.state_dict(), f"{path} (EMA weights)")
    model.load_state_dict(state["model"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # older checkpoints hold the empty state of a disabled scaler
        trainer.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) == ctx.world_size:
        set_rng_state(rngs[ctx.rank], device)
    else:
        set_rng_state(rngs[0], device)
        if ctx.rank:
            torch.manual_seed(cfg.seed + ctx.rank)
        log(f"note: {path} was written by {len(rngs)} process(es), this run has {ctx.world_size}: data, "
            "augmentation, noise, timesteps and dropout continue exactly (all keyed)")
    step = int(state["step"])
    log(f"resumed from {path} at step {step}")
    return step, Precision(*state["precision"])


def _train(cfg: TrainConfig, ctx: Dist, device: torch.device, log) -> dict:
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must be divisible by the "
                         f"{ctx.world_size} processes")
    local_batch = cfg.batch_size // ctx.world_size
    existing = checkpoint_files(out)
    if cfg.resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint to resume in {out} (expected {ckpt_path})")
    if not cfg.resume and existing:
        raise FileExistsError(f"{existing[0]} exists: pass --resume to continue that run, or choose another --out")
    ctx.barrier()  # every process has looked before rank 0 writes anything
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:
            raise FileExistsError(f"--out {out} exists and is not a folder") from e
        except OSError as e:
            raise storage_error(e, out, "creating the run folder") from e
    with contextlib.ExitStack() as stack:
        if ctx.is_main:
            try:
                stack.enter_context(_RunLock(out, log))
            except FileExistsError:
                raise
            except OSError as e:  # the first write into --out: permissions, read-only file system, full disk
                raise storage_error(e, out / ".lock", "creating") from e
        return _train_locked(cfg, ctx, device, log, out, ckpt_path, local_batch, stack)


def _train_locked(cfg: TrainConfig, ctx: Dist, device: torch.device, log, out: Path, ckpt_path: Path,
                  local_batch: int, stack: contextlib.ExitStack) -> dict:
    if ctx.is_main:
        for stale in remove_stale_temps(out):
            log(f"removed {stale}, a temporary file left by an interrupted checkpoint write")

    train_ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test_ds = load_dataset(cfg.dataset, "test", cfg.data_dir)
    check_dataset(cfg, train_ds)
    # Semi-supervised: an ImageDataset only holds labels in [0, num_classes), so the examples whose
    # label is dropped carry the extra id `unlabelled`, turned into -1 in each batch.
    unlabelled = train_ds.num_classes
    if cfg.labelled_fraction < 1.0:
        labels = keep_labels(train_ds.labels, cfg.labelled_fraction, cfg.seed)
        train_ds = dataclasses.replace(train_ds, labels=np.where(labels < 0, unlabelled, labels),
                                       num_classes=unlabelled + 1)
    if cfg.batch_size > len(train_ds):
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(train_ds)} training images")

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = build_model(cfg, device)
    precision = choose_precision(cfg.amp, device)
    if precision.dtype is not None and device.type == "cpu" and not cfg.resume:
        x, y = next(infinite_batches(train_ds, local_batch, seed=cfg.seed, device=device, augment=False))
        y = y.masked_fill(y == unlabelled, -1)
        precision = _probe_cpu_amp(model, x, y, precision, log)
        precision = ctx.gather_objects(precision)[0]  # every process follows rank 0's measurement
    if ctx.enabled and model.head is not None:
        distributed.convert_sync_batchnorm(model.head)  # head statistics over the global batch
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    why = "asked" if cfg.compile is not None else ("default on CUDA" if use_compile else
                                                    "default off on CPU: compile time outweighs the gain; --compile to force")
    channels_last = cfg.channels_last if cfg.channels_last is not None else True
    trainer = TrainStep.from_config(cfg, model, precision, compile=use_compile, dist=ctx, channels_last=channels_last)
    optimizer, scheduler, scaler, ema = trainer.optimizer, trainer.scheduler, trainer.scaler, trainer.ema
    if ctx.is_main:  # before any step: a run that cannot save its first checkpoint does not start
        _check_free_space(out, model, checkpoint_files(out))
    start_step = 0
    if cfg.resume:
        start_step, precision = _restore(cfg, trainer, out=out, ctx=ctx, log=log)
        trainer.precision = precision  # the precision the run started with
    elif ctx.rank:
        torch.manual_seed(cfg.seed + ctx.rank)  # per-process global RNG streams (no step draws from them)
    if start_step >= cfg.steps:
        log(f"nothing to do: the run in {out} is at step {start_step} >= --steps {cfg.steps}; no file was "
            f"changed (pass --steps > {start_step} to continue it)")
        return {"kind": "eval", "step": start_step, "nothing_to_do": True}
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        (out / "config.json").write_text(cfg.to_json())
        if cfg.resume:
            _truncate_metrics(metrics_path, start_step)
        elif metrics_path.exists():  # left by a run killed before its first checkpoint: keep it, apart
            kept = metrics_path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            metrics_path.rename(kept)
            log(f"note: {metrics_path} of an earlier run (no checkpoint) moved to {kept}; this run starts a new one")
    tb = stack.enter_context(TensorBoardLog(out / "tb", start_step)) if ctx.is_main and cfg.tensorboard else None

    # The diffusion term trains on the clean images x, the classifier on the loader's augmented copy
    # x_aug (None with --no-augment or a classifier on x_t), drawn per example from
    # (seed, epoch, position), so it is the same for any number of processes and on resume.
    # Shard i of n holds examples [i * B/n, (i+1) * B/n) of each global batch.
    augment = classifier_augment(cfg)
    batches = infinite_batches(train_ds, local_batch, seed=cfg.seed, start_step=start_step,
                               shard=(ctx.rank, ctx.world_size), backend=cfg.loader, device=device,
                               augment=augment is not None, augment_config=augment, keep_clean=True)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device {device} | precision {precision.name}: {precision.reason} | compile {use_compile} ({why})")
    log(f"step: {trainer.describe()}")
    if ctx.enabled:
        log(f"data parallel: {ctx.world_size} processes ({dist_backend()}), global batch {cfg.batch_size} = "
            f"{ctx.world_size} x {local_batch}")
    shape = "no head" if model.head is None else f"head input {model.head.in_features}"
    shape = shape if model.unet.has_decoder else f"no decoder, {shape}"
    log(f"objective {cfg.model.objective} | model {n_params / 1e6:.2f}M parameters ({shape}) | "
        f"data {train_ds.name}: {len(train_ds)} train / {len(test_ds)} test | out {out}")

    def record(entry: dict) -> None:
        if ctx.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if tb is not None:
                tb.write(entry)

    def save(step: int) -> None:
        # A host sync per save: no checkpoint ever holds a non-finite weight (a learning rate of inf,
        # say, makes them so without a non-finite loss or gradient).
        if not bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()):
            good = ckpt_path if ckpt_path.exists() else None
            raise NonFiniteLossError(
                f"the weights became non-finite by step {step} (non-finite parameters); no checkpoint of them "
                f"was written. Last good checkpoint: {good or 'none (the run wrote none yet)'}")
        rngs = ctx.gather_objects(rng_state(device))  # every process's RNG (a collective)
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "config": dataclasses.asdict(cfg), "step": step, "model": model.state_dict(),
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "precision": (precision.dtype, precision.use_scaler, precision.reason),
                "rng": rngs, "world_size": ctx.world_size,
                "data_position": {"seed": cfg.seed, "step": step, "global_batch": cfg.batch_size},
            })

    def evaluate(step: int, final: bool = False) -> dict:
        # What the objective's model can do: accuracy with a head, sample grids with a decoder.
        entry = {"kind": "eval", "step": step, "objective": cfg.model.objective}
        if model.head is not None:
            entry["test_acc_raw"] = test_accuracy(model, test_ds, device, dist=ctx)
            entry["test_acc_ema"] = test_accuracy(ema.model, test_ds, device, dist=ctx)
        if ctx.is_main and model.unet.has_decoder:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                samples = preview_samples(ema.model, cfg.num_samples, cfg.sample_steps, cfg.seed, device, cfg.sampler)
            grid = save_grid(samples, out / ("samples_final.png" if final else f"samples_{step:07d}.png"))
            entry["samples"] = str(grid)
        record(entry)
        return entry

    model.train()
    guard = _NonFiniteGuard(cfg.max_nonfinite)
    # total, diffusion, classifier (finite steps only), finite steps, correct, labelled: no per-step sync
    sums = torch.zeros(6, device=device)
    tick_start, tick_steps = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stdout,
               disable=None if ctx.is_main else True)
    preempt = stack.enter_context(_PreemptFlag(ctx))
    for step in range(start_step, cfg.steps):
        x, y, x_aug = next(batches)
        if cfg.labelled_fraction < 1.0:
            y = y.masked_fill(y == unlabelled, -1)
        losses, bad = trainer(x, y, step, x_cls=x_aug)
        guard.record(step, bad)
        terms = torch.stack([losses.total.detach(), losses.diffusion.detach(), losses.classifier.detach()]).float()
        sums += torch.cat([torch.where(bad, 0.0, terms), (~bad).float()[None],
                           torch.stack([losses.correct, losses.labelled]).float()])
        tick_steps += 1
        done = step + 1
        bar.update(1)
        tick = done % cfg.log_every == 0 or done == cfg.steps
        save_now = done % cfg.save_every == 0 or done == cfg.steps
        if tick or save_now:
            guard.check(ctx, precision, ckpt_path, log)  # one host sync per tick or save
        if tick:
            tick_sums = ctx.all_reduce_(sums.clone()).tolist()
            finite_steps = tick_sums[3] / ctx.world_size
            total, diff, cls = (v / ctx.world_size / finite_steps if finite_steps else math.nan for v in tick_sums[:3])
            correct, labelled_n = tick_sums[4:]
            elapsed = time.perf_counter() - tick_start
            entry = {"kind": "train", "step": done, "loss": total, "diffusion": diff, "classifier": cls,
                     "train_acc": correct / labelled_n if labelled_n else None,
                     "img_per_s": tick_steps * cfg.batch_size / elapsed, "lr": scheduler.get_last_lr()[0],
                     "peak_mem_mb": _peak_memory_mb(device), "nonfinite_steps": tick_steps - round(finite_steps)}
            record(entry)
            bar.set_postfix(loss=f"{diff:.4f}", cls=f"{cls:.3f}",
                            acc="-" if entry["train_acc"] is None else f"{entry['train_acc']:.3f}",
                            img_s=f"{entry['img_per_s']:.0f}")
            sums.zero_()
            tick_start, tick_steps = time.perf_counter(), 0
        signum = preempt.stop_signal()
        if save_now or signum:
            save(done)
        if signum:
            bar.close()
            ctx.barrier()
            raise Preempted(signum, done, ckpt_path)
        if done % cfg.eval_every == 0 and done != cfg.steps:
            eval_start = time.perf_counter()
            result = evaluate(done)
            tick_start += time.perf_counter() - eval_start  # keep evaluation out of images/s
            if ctx.is_main:
                bar.write(f"step {done}: {_describe_eval(result)}")
    bar.close()
    final = evaluate(cfg.steps, final=True)
    if ctx.is_main:
        export_safetensors(model, out / "model.safetensors", cfg, "raw", cfg.steps)
        export_safetensors(ema.model, out / "model_ema.safetensors", cfg, "ema", cfg.steps)
        log(f"final (step {cfg.steps}): {_describe_eval(final, samples=False)}")
        grid = f"{final['samples']}, " if "samples" in final else ""
        log(f"wrote {ckpt_path}, {out / 'model.safetensors'}, {out / 'model_ema.safetensors'}, {grid}{metrics_path}")
    ctx.barrier()  # no process leaves (and tears the group down) while rank 0 still writes
    return final


def _describe_eval(entry: dict, samples: bool = True) -> str:
    parts = []
    if "test_acc_raw" in entry:
        parts.append(f"test accuracy raw {entry['test_acc_raw']:.2%} | EMA {entry['test_acc_ema']:.2%}")
    else:
        parts.append(f"no test accuracy (objective {entry['objective']}: no classifier head)")
    if samples and "samples" in entry:
        parts.append(f"samples {entry['samples']}")
    return " | ".join(parts)


def dist_backend() -> str:
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "single process"
