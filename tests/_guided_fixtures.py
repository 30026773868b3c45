"""Fixtures of tests/test_convert_guided.py: state dicts of the authors' JDM code and of OpenAI's
guided-diffusion, and what the original code computes from them.

The authors' head hard-codes ``in_features = 29 * num_channels`` (only the CIFAR layout with 3 res
blocks runs) and their GroupNorm has 32 groups (so >= 32 channels): their smallest joint model has
3.7M parameters, 15 MB in fp32. So the weights are not stored: each fixture stores the state
dict's keys, shapes and dtypes (``manifest.json``), and :func:`fill` draws the values from NumPy's
``RandomState`` (whose stream NumPy keeps frozen across versions) with the fixture's seed; the
manifest's sha256 of the drawn tensors is checked before use, so a filler that ever draws
differently fails loudly instead of as a numeric mismatch. ``io.safetensors`` holds the input and
the original model's outputs. ``generate.py`` (next to the fixtures; never run by the tests) made
both with the original code; see the README there.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "guided_diffusion"
NUM_BATCHES_TRACKED = 1000  # the value every BatchNorm's num_batches_tracked gets


def fill(keys: list, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for ``keys`` (``[name, shape, dtype]`` in state-dict order): every
    tensor non-zero (zero-initialised layers too, so that a wrong map of them shows), scaled so the
    activations stay O(1) through a random UNet:

    * 2+-d weights: ``u * sqrt(3 / fan_in)`` (variance 1 / fan_in), ``u`` uniform in [-1, 1)
    * 1-d ``weight`` (norm scales): ``1 + 0.25 u``; ``bias``: ``0.25 u``
    * BatchNorm ``running_mean``: ``0.5 u``; ``running_var``: ``1 + 0.5 u``
    * int64 (``num_batches_tracked``): :data:`NUM_BATCHES_TRACKED`
    """
    rs = np.random.RandomState(seed)
    out = {}
    for name, shape, dtype in keys:
        shape = tuple(shape)
        if dtype == "int64":
            out[name] = torch.full(shape, NUM_BATCHES_TRACKED, dtype=torch.int64)
            continue
        if dtype != "float32":
            raise ValueError(f"fill: unexpected dtype {dtype} of {name}")
        u = rs.random_sample(math.prod(shape)) * 2.0 - 1.0
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            v = 1.0 + 0.5 * u
        elif leaf == "running_mean":
            v = 0.5 * u
        elif len(shape) >= 2:
            v = u * math.sqrt(3.0 / math.prod(shape[1:]))
        elif leaf == "weight":
            v = 1.0 + 0.25 * u
        else:
            v = 0.25 * u
        out[name] = torch.from_numpy(v.astype(np.float32).reshape(shape))
    return out


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every key, dtype, shape and the tensor's bytes, in order."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def manifest(name: str) -> dict:
    return json.loads((FIXTURES / name / "manifest.json").read_text())


def state_dict(name: str) -> dict[str, torch.Tensor]:
    """The fixture's state dict, as the original model held it (checked against its sha256)."""
    m = manifest(name)
    state = fill(m["keys"], m["seed"])
    got = digest(state)
    if got != m["sha256"]:
        raise AssertionError(f"fixture {name}: the drawn weights' sha256 {got} is not the recorded "
                             f"{m['sha256']}: fill() no longer draws what generate.py drew")
    return state


def outputs(name: str) -> dict[str, torch.Tensor]:
    """x, t (the eps input), eps (the original's prediction) and, with a head, logits (the
    original's ``classify(x)``, i.e. at t = 0), all computed in fp32, eval mode."""
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name / "io.safetensors"))
