"""One optimisation step: the object the trainer runs and the benchmarks time.

``TrainStep`` owns everything one step does, in this order:

1. the batch key (``BatchKey``: seed, step, this process's first global example, global batch,
   global labelled count) when the model takes one (``JointDiffusion``; the plain-PyTorch
   baseline of benchmarks/ draws its own timesteps and noise);
2. the forward joint loss under autocast, through DDP and torch.compile when asked;
3. backward through the GradScaler (dynamic scale for fp16, a fixed scale of 1 for fp32/bf16,
   which is exact and makes every precision skip a step whose gradients are non-finite);
4. unscale + gradient clipping (``grad_clip``), scaler step and update, ``zero_grad``;
5. the LR schedule, the EMA update, and the step's non-finite flag (a device tensor).

On a CPU the step also makes glibc's malloc keep freed memory (``retain_cpu_memory``): without it
every step's activations come from fresh, zero-filled pages.

The training loop keeps the data, the ticks, evaluation and checkpoints; it reads the step's
optimizer, scheduler, scaler and EMA for its checkpoints. Nothing in a step reads a device value
on the host: with the fused AdamW (CUDA) the scaler passes its scale and inf flag to the
optimizer as tensors, the clip is computed on the device, and the step's losses stay tensors.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from jdm_fast.models.joint import BatchKey
from jdm_fast.ops.norm import memory_format_of
from jdm_fast.training.config import COMPILE_MODES
from jdm_fast.training.distributed import Dist
from jdm_fast.training.ema import EMA
from jdm_fast.training.precision import Precision, autocast


class StepResult(NamedTuple):
    losses: Any  # what the model's forward returned (JointLoss for JointDiffusion); losses[0] is the total
    nonfinite: torch.Tensor  # 0-d bool on the device: the total was non-finite, the update was skipped


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, how it runs): AdamW fused on CUDA and CPUs, foreach elsewhere; apex FusedAdam if asked."""
    if name == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise ValueError("--optimizer apex needs NVIDIA apex installed; use --optimizer adamw") from e
        return FusedAdam(model.parameters(), lr=lr, weight_decay=weight_decay, adam_w_mode=True), "apex FusedAdam"
    if name != "adamw":
        raise ValueError(f"optimizer must be adamw or apex, got {name!r}")
    # One fused kernel per parameter group: on a 2-core CPU 20 ms per step for 60M parameters
    # against 136 ms for the foreach / for-loop implementations (each a pass per operation).
    fused = device.type in ("cuda", "cpu")
    cls = _DenseViewAdamW if device.type == "cpu" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None,
              foreach=None if fused else True)
    return opt, "AdamW (fused)" if fused else "AdamW (foreach)"


class _DenseViewAdamW(torch.optim.AdamW):
    """AdamW whose fused CPU kernel gets each channels-last 4-D parameter, with its gradient and
    moments when they share that layout, as ``permute(0, 2, 3, 1)``: a contiguous view of the same
    memory. The kernel copies non-contiguous tensors to contiguous ones and back: with the CIFAR
    preset's 68 channels-last conv weights its optimizer step took 68-71 ms instead of 44 (2-core
    Xeon). The update is elementwise and in place, so parameters, state and checkpoints are those
    of AdamW."""

    def _init_group(self, group, *args):
        out = super()._init_group(group, *args)
        params = args[0]  # then grads, moments, steps: lists in step with params (amsgrad's when used)
        lists = [a for a in args if isinstance(a, list) and len(a) == len(params)]
        for i, p in enumerate(params):
            if all(memory_format_of(lst[i]) == torch.channels_last for lst in lists if lst[i].dim() > 0):
                for lst in lists:
                    if lst[i].dim() == 4:
                        lst[i] = lst[i].permute(0, 2, 3, 1)
        return out


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest accepted M_MMAP_THRESHOLD on 64-bit
_cpu_memory_retained: bool | None = None


def retain_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS (once per
    process; Linux/glibc only, else a no-op returning False).

    PyTorch's CPU allocator is malloc: every step allocates and frees the same activations and
    gradients, and with glibc's defaults blocks above its dynamic mmap threshold come from fresh
    mmaps whose pages are zero-filled on first touch. Measured on a 2-core AMD EPYC (AVX-512), the
    CIFAR preset at batch 8: ~57,700 page faults per step, 154 with these settings (blocks up to
    32 MiB from the heap, no trimming); the step's time drops by ~10%. The cost: the process keeps
    its peak heap (it would reach it again at the next step anyway)."""
    global _cpu_memory_retained
    if _cpu_memory_retained is None:
        _cpu_memory_retained = False
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and libc.mallopt(_M_TOP_PAD, 64 * 2**20) == 1)
            _cpu_memory_retained = ok
    return _cpu_memory_retained


class TrainStep:
    """One optimisation step of ``model`` (see the module docstring).

    ``step(x, y, i, x_cls)`` runs step ``i`` (0-based global step: it keys the randomness and the
    EMA warm-up) on this process's batch (``x`` clean; ``x_cls``, when given, the classifier's
    augmented copy of it, from the loader) and returns a :class:`StepResult`. ``model`` stays the
    uncompiled, unwrapped module (what checkpoints hold); ``forward`` is what runs.
    """

    def __init__(self, model: nn.Module, *, precision: Precision, lr: float, weight_decay: float = 0.0,
                 optimizer: str = "adamw", warmup_steps: int = 0, grad_clip: float | None = None,
                 ema_decay: float | None = None, compile: bool = False, compile_mode: str = "default",
                 compile_backend="inductor", fullgraph: bool = False, dist: Dist | None = None, seed: int = 0,
                 global_batch: int | None = None, keyed: bool = True, channels_last: bool = False):
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None), got {grad_clip}")
        self.model = model
        self.device = next(model.parameters()).device
        self.retains_memory = self.device.type == "cpu" and retain_cpu_memory()
        self.channels_last = channels_last
        if channels_last and not all(p.is_contiguous(memory_format=torch.channels_last)
                                     for p in model.parameters() if p.dim() == 4):
            model.to(memory_format=torch.channels_last)  # every 4-D weight (so every feature map); values unchanged
        self.precision = precision
        self.grad_clip = grad_clip
        self.dist = dist or Dist()
        self.seed, self.global_batch, self.keyed = seed, global_batch, keyed
        self.optimizer, self.optimizer_name = make_optimizer(model, optimizer, lr, weight_decay, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
        # fp16: the usual dynamic loss scale. fp32/bf16: scale fixed at 1 (update(1.0) below), used only
        # to skip steps whose gradients are non-finite.
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**16 if precision.use_scaler else 1.0)
        self.ema = EMA(model, ema_decay) if ema_decay is not None else None
        forward: nn.Module = model
        if self.dist.enabled:
            forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled = compile
        self.compile_mode = compile_mode if compile else None
        if compile:
            # dynamic=False: a training step has one shape; a recompile must never turn the graph
            # symbolic (slower code, and torch 2.11's Inductor crashed on our Triton ops there).
            # compile_backend: Inductor; benchmarks/cuda_rehearsal.py passes Inductor wrapped to stop
            # before anything would launch (it traces the CUDA step on a machine without a GPU), with
            # fullgraph=True (a graph break is an error there, a slower step here).
            forward = torch.compile(forward, backend=compile_backend, fullgraph=fullgraph,
                                    mode=None if compile_mode == "default" else compile_mode, dynamic=False)
        self.forward = forward

    @classmethod
    def from_config(cls, cfg, model: nn.Module, precision: Precision, *, compile: bool, dist: Dist | None = None,
                    keyed: bool = True, channels_last: bool = False, compile_backend="inductor",
                    fullgraph: bool = False) -> "TrainStep":
        """The step a ``TrainConfig`` describes (optimizer, LR warm-up, clipping, EMA, seed, batch)."""
        return cls(model, precision=precision, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                   warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
                   compile=compile, compile_mode=cfg.compile_mode, compile_backend=compile_backend,
                   fullgraph=fullgraph, dist=dist, seed=cfg.seed, global_batch=cfg.batch_size, keyed=keyed,
                   channels_last=channels_last)

    def describe(self) -> str:
        compiled = f"torch.compile mode {self.compile_mode}" if self.compiled else "eager"
        layout = "channels-last" if self.channels_last else "NCHW"
        malloc = ", glibc malloc keeps freed memory" if self.retains_memory else ""
        return f"{self.optimizer_name}, {compiled}, {layout}, EMA {'foreach lerp' if self.ema else 'off'}{malloc}"

    def key(self, y: torch.Tensor, step: int) -> BatchKey:
        """The batch key of this process's rows of global batch ``step`` (a collective under DDP)."""
        local = y.shape[0]
        global_batch = self.global_batch or local * self.dist.world_size
        labelled = self.dist.all_reduce_(self.model.labelled_mask(y).sum())  # the CE's global denominator
        start = self.dist.rank * local
        # The first global example index as a device tensor made by a fill kernel (no copy from the
        # host): the draws read it on the device, and the compiled graph never sees the step number.
        first = torch.full((), step * global_batch + start, dtype=torch.int64, device=self.device)
        return BatchKey(self.seed, step, start, global_batch, labelled, first)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, x_cls: torch.Tensor | None = None) -> StepResult:
        extra = {} if x_cls is None else {"x_cls": x_cls}  # the baseline model of benchmarks/ takes none
        with autocast(self.device, self.precision):
            if self.keyed:
                losses = self.forward(x, y, key=self.key(y, step), **extra)
            else:
                losses = self.forward(x, y, **extra)
        total = losses[0]
        self.scaler.scale(total).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)  # skipped when the gradients are non-finite
        self.scaler.update(None if self.precision.use_scaler else 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # after a skipped first step torch warns that the order is wrong
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
        return StepResult(losses, ~torch.isfinite(total.detach()))
