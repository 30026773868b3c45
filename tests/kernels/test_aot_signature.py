"""aot_signature (kernels/_launch.py): the ahead-of-time compile signature is read off a kernel's
own parameter list, so a new kernel argument cannot be left out of it. In-process, no compile
(the AOT tests of the kernel files compile every signature)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from jdm_fast.kernels import attention, group_norm
from jdm_fast.kernels._launch import aot_signature


@triton.jit
def _kernel(x_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * eps, mask=offs < n)


POINTERS = {"x_ptr": "bf16", "out_ptr": torch.float32, "other_ptr": "fp16"}  # extra names are ignored


def test_signature_follows_the_kernel_parameters():
    sig, const = aot_signature(_kernel, POINTERS, {"BLOCK": 64}, scalars={"eps": "fp64"})
    assert list(sig.items()) == [("x_ptr", "*bf16"), ("out_ptr", "*fp32"), ("n", "i32"), ("eps", "fp64"),
                                 ("BLOCK", "constexpr")]
    assert const == {"BLOCK": 64}
    sig, const = aot_signature(_kernel, POINTERS, {"BLOCK": 64}, scalars={"eps": "fp32"}, ones=("n",))
    assert sig["n"] == "constexpr" and const == {"n": 1, "BLOCK": 64}


@pytest.mark.parametrize("pointers,constexprs,ones,match", [
    ({"x_ptr": "fp32"}, {"BLOCK": 64}, (), "no dtype for pointer argument 'out_ptr' of _kernel"),
    (POINTERS, {}, (), "no value for constexpr 'BLOCK' of _kernel"),
    (POINTERS, {"BLOCK": 64, "n": 3}, (), r"\['n'\] are not constexpr / integer arguments"),
    (POINTERS, {"BLOCK": 64}, ("eps",), r"\['eps'\] are not constexpr / integer arguments"),
    (POINTERS, {"BLOCK": 64}, ("m",), r"\['m'\] are not constexpr / integer arguments"),
])
def test_what_the_kernel_does_not_take_raises(pointers, constexprs, ones, match):
    with pytest.raises(ValueError, match=match):
        aot_signature(_kernel, pointers, constexprs, scalars={"eps": "fp32"}, ones=ones)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", torch.bfloat16])
def test_every_kernel_config_and_dtype_has_a_full_signature(dtype):
    for kind in ("fwd", "bwd"):
        for cfg in group_norm.ALL_CONFIGS:
            fn, sig, const = group_norm.aot_compile_args(kind, cfg, dtype, weight_dtype="bf16", eps_dtype="fp64")
            assert list(sig) == fn.arg_names
            assert const == {"SINGLE_PASS": cfg.single_pass, "BLOCK_C": cfg.block_c, "BLOCK_HW": cfg.block_hw}
            assert sig["w_ptr"] == sig["b_ptr"] == "*bf16" and sig.get("eps", "fp64") == "fp64"
    fn, sig, _ = group_norm.aot_compile_args("reduce", None, dtype)
    assert list(sig) == fn.arg_names
    for kind in attention.KERNEL_KINDS:
        for cfg in attention.ALL_CONFIGS:
            fn, sig, const = attention.aot_compile_args(kind, cfg, dtype, scale_dtype="fp64")
            assert list(sig) == fn.arg_names
            assert const == cfg.launch(kind)[0]
            assert sig.get("scale", "fp64") == "fp64" and sig.get("lse_ptr", "*fp32") == "*fp32"
