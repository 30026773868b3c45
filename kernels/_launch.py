"""How the launchers call a kernel: through ``torch.library.wrap_triton``, so that torch.compile
(Inductor) sees the kernel inside our ``triton_op``s, except under Triton's interpreter
(``TRITON_INTERPRET=1``), where the kernel is an interpreted function that torch < 2.12's
``wrap_triton`` rejects ("only works on functions annotated with triton.jit") and nothing is
compiled anyway: there the kernel is called directly."""
from __future__ import annotations

import os

import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton at its import, once


def launcher(kernel):
    """``launcher(kernel)[grid](*args, **meta)`` launches ``kernel``."""
    return kernel if INTERPRETER else torch.library.wrap_triton(kernel)


def compile_options(cfg, kind: str) -> dict:
    """The options (num_warps, num_stages) kernel ``kind`` of launch config ``cfg`` is compiled with,
    as its launcher runs it: ``cfg.launch(kind)``'s, or 4 warps for the config-less GroupNorm
    reduction. The ahead-of-time compiles of the tests and of benchmarks/kernel_resources.py use
    it, so they compile what runs."""
    if cfg is None:
        return {"num_warps": 4}
    return cfg.launch(kind)[1]
