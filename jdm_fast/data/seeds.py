"""Seed derivation for the data layer: every random draw of loading and augmentation is a function
of integers (seed, epoch, position, tag), never of the global RNG, so the draws are the same on
every device, backend and number of processes, and resuming at any batch is exact."""
from __future__ import annotations

_MASK64 = (1 << 64) - 1
PERM_TAG = 0x5045524D  # "PERM": keeps the order seed apart from augmentation seeds
AUG_TAG = 0x415547  # "AUG": the augmentation seed of an epoch, and the Philox counter tag of its draws


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


def augment_seed(seed: int, epoch: int) -> int:
    """The Philox key of epoch ``epoch``'s augmentation draws: ``derive_seed(seed, epoch, AUG_TAG)``,
    in [0, 2^63), so it fits the counter ops' int64 seed as it is."""
    return derive_seed(seed, epoch, AUG_TAG)
