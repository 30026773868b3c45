"""Data-parallel plumbing for the trainer: the process group torchrun describes, collectives that
are no-ops in a single process, and a SyncBatchNorm that also runs on CPU (gloo).

``torchrun --nproc_per_node=N -m jdm_fast.train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous variables; :func:`setup` then joins the group (NCCL on GPUs, gloo on CPU) and picks the
device ``cuda:LOCAL_RANK``. Without those variables (or with WORLD_SIZE=1) everything here is a
single-process no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """In-place sum (or ``op``) over processes; returns ``tensor``."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        return tensor

    def gather_objects(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; for small state)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any) and choose this process's device.

    ``device_name`` is ``--device``: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` under torchrun;
    an explicit ``cuda:N`` is only accepted in a single process.
    """
    world = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():  # the caller built the group
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx = Dist(rank, world, _env_int("LOCAL_RANK", 0), False)
    elif world > 1:
        if not dist.is_available():
            raise ValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
        ctx = Dist(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), True)
    else:
        ctx = Dist()
    device = _device(device_name, ctx)
    if ctx.owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return ctx, device


def _device(name: str, ctx: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
        elif ctx.enabled:
            raise ValueError(f"--device {name}: with {ctx.world_size} processes each one uses cuda:LOCAL_RANK; "
                             "pass --device cuda (or auto)")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: {torch.cuda.device_count()} GPU(s) visible "
                             f"(LOCAL_RANK={ctx.local_rank})")
        torch.cuda.set_device(device)
    return device


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the backward sums the gradients (what d(sum)/d(inputs) needs)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (all processes).

    torch.nn.SyncBatchNorm is GPU-only; this one runs on every backend (gloo included), so the
    CPU tests prove the code the GPUs run. Two passes (mean, then centred squares), each one
    differentiable all-reduce of a (C,)-sized tensor: negligible next to the UNet for the head's
    (B, F) features. Same constructor, parameters and state_dict keys as BatchNorm1d; in eval mode,
    or outside a process group, it is exactly BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"SyncBatchNorm1d expects (B, C) input, got {tuple(x.shape)}")
        xf = x.float()
        count = _AllReduceSum.apply(torch.tensor([float(x.shape[0])], device=x.device))
        mean = _AllReduceSum.apply(xf.sum(dim=0)) / count
        var = _AllReduceSum.apply((xf - mean).square().sum(dim=0)) / count  # biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d in ``module`` by a :class:`SyncBatchNorm1d` with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            sync = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=child.weight.device if child.affine else None)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
