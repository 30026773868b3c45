"""Seed derivation for the data layer: every random draw of loading and augmentation comes from a
generator seeded by a hash of integers (seed, epoch, batch, shard, tag), never the global RNG, so
the draws are the same on every device and backend and resuming at any batch is exact."""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
PERM_TAG = 0x5045524D  # "PERM": keeps the order seed apart from augmentation seeds
AUG_TAG = 0x415547  # "AUG"


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 chain): stable across runs and platforms."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ _splitmix64(int(p) & _MASK64))
    return h >> 1


def augment_generator(seed: int, epoch: int, batch_index: int, shard_index: int,
                      device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a batch's augmentation draws: a function of (seed, epoch, batch, shard), so
    every backend draws the same flips/offsets/jitter for the same batch and skipping is exact."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, epoch, batch_index, shard_index, AUG_TAG))
    return generator
