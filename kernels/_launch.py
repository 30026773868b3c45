"""How the launchers call a kernel, and what an ahead-of-time compile of it takes.

Launchers call a kernel through ``torch.library.wrap_triton``, so that torch.compile (Inductor)
sees the kernel inside our ``triton_op``s, except under Triton's interpreter
(``TRITON_INTERPRET=1``), where the kernel is an interpreted function that torch < 2.12's
``wrap_triton`` rejects ("only works on functions annotated with triton.jit") and nothing is
compiled anyway: there the kernel is called directly."""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping

import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton at its import, once

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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


def tl_dtype(dtype) -> str:
    """Triton's name ("fp32", "fp16", "bf16") of a torch dtype or of such a name."""
    return dtype if isinstance(dtype, str) else _TL_DTYPE[dtype]


def aot_signature(kernel, pointers: Mapping[str, str], constexprs: Mapping[str, object],
                  scalars: Mapping[str, str] = {}, ones: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(signature, constexprs) for ``triton.compile(ASTSource(kernel, signature, constexprs))``,
    read off the kernel's own parameter list, in its order:

    - a ``tl.constexpr`` parameter takes its value from ``constexprs``;
    - a parameter named ``*_ptr`` points to ``pointers[name]`` ("fp32", "bf16", ...);
    - a parameter named in ``scalars`` has that type (e.g. "fp64": a float as Inductor passes it);
    - any other parameter is an integer, typed i32 as the JIT types ints of these sizes, or the
      constant 1 when named in ``ones`` (Triton <= 3.6's JIT specializes an int equal to 1).

    A kernel argument none of these covers, or a name in ``constexprs`` / ``ones`` the kernel does
    not take as such, raises: a new kernel argument needs an AOT edit only when it is a pointer
    of a name ``pointers`` does not know.
    """
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    sig, const, ints = {}, {}, set()
    for arg, p in inspect.signature(getattr(kernel, "fn", kernel)).parameters.items():
        if "constexpr" in str(p.annotation):  # as triton.runtime.jit.KernelParam.is_constexpr
            if arg not in constexprs:
                raise ValueError(f"aot_signature: no value for constexpr {arg!r} of {name}")
            sig[arg], const[arg] = "constexpr", constexprs[arg]
        elif arg.endswith("_ptr"):
            if arg not in pointers:
                raise ValueError(f"aot_signature: no dtype for pointer argument {arg!r} of {name}")
            sig[arg] = "*" + tl_dtype(pointers[arg])
        elif arg in scalars:
            sig[arg] = scalars[arg]
        elif arg in ones:
            sig[arg], const[arg] = "constexpr", 1
            ints.add(arg)
        else:
            sig[arg] = "i32"
            ints.add(arg)
    unknown = [k for k in constexprs if sig.get(k) != "constexpr"] + [k for k in ones if k not in ints]
    if unknown:
        raise ValueError(f"aot_signature: {unknown} are not constexpr / integer arguments of {name}")
    return sig, const
