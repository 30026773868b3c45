"""Evaluation used during training: head accuracy on the test split, preview samples."""
from __future__ import annotations

import torch

from jdm_fast.data import ImageDataset
from jdm_fast.data.images import from_uint8
from jdm_fast.diffusion import make_generator, sample_ancestral, sample_ddim
from jdm_fast.models.joint import JointDiffusion
from jdm_fast.training.distributed import Dist


@torch.no_grad()
def test_accuracy(model: JointDiffusion, dataset: ImageDataset, device: torch.device, batch_size: int = 500,
                  dist: Dist | None = None) -> float:
    """Head accuracy at t = 0, eval mode, no augmentation (PAPER.md's protocol), in fp32.

    With ``dist`` (several processes), each process classifies its contiguous slice of the test
    set and the correct counts are summed over processes: every process returns the same value."""
    was_training = model.training
    model.eval()
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    lo, hi = len(dataset) * rank // world, len(dataset) * (rank + 1) // world
    correct = torch.zeros((), dtype=torch.long, device=device)
    images = torch.from_numpy(dataset.images)  # (N, H, W, C) uint8
    labels = torch.from_numpy(dataset.labels)
    for i in range(lo, hi, batch_size):
        j = min(i + batch_size, hi)
        x = from_uint8(images[i:j], device)
        y = labels[i:j].to(device)
        correct += (model.classify(x).argmax(dim=1) == y).sum()
    if dist is not None:
        dist.all_reduce_(correct)
    model.train(was_training)
    return correct.item() / len(dataset)


@torch.no_grad()
def preview_samples(model: JointDiffusion, num: int, steps: int, seed: int, device: torch.device,
                    sampler: str = "ancestral") -> torch.Tensor:
    """Samples from a fixed seed (so grids of successive evaluations are comparable): the ancestral
    sampler on ``steps`` respaced timesteps, or DDIM (eta = 0) with ``steps`` steps. Early in
    training the ancestral sampler gives much cleaner images than DDIM at the same step count."""
    was_training = model.training
    model.eval()
    cfg = model.config.unet
    sample = {"ancestral": sample_ancestral, "ddim": sample_ddim}[sampler]
    x = sample(model.unet, model.diffusion, (num, cfg.in_channels, cfg.image_size, cfg.image_size),
               steps=steps, generator=make_generator(seed, device), device=device)
    model.train(was_training)
    return x
