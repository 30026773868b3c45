"""Static GPU resources (benchmarks/kernel_resources.py: ptxas -v on the ahead-of-time PTX) of the
launch configs the engine picks on the presets it trains: no register spills, and occupancy floors.

Floors (resident warps per SM out of 64), both 8 warps (12.5%): the attention kernels are
tensor-core tiles that trade occupancy for registers, as FlashAttention-2 does (4-8 warps per SM
on an A100), and two 4-warp programs per SM is what their 200-255 registers allow. GroupNorm is
memory-bound: most picked configs reach 16-32 warps, but the looped kernels (groups larger than
one 4096-element tile: the CIFAR preset's 512-channel decoder norms) hold 170-200 registers a
thread and sit at one 8-warp program per SM: 2048-element chunks need as many registers, and 16
warps over a 4096-element chunk spill. The floor guards that level (a program of 4 warps alone
would halve the loads in flight); BENCHMARKS.md lists the gap."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_resources as kr  # noqa: E402

from jdm_fast.kernels import attention, group_norm  # noqa: E402
from jdm_fast.models.unet import UNet  # noqa: E402
from jdm_fast.nn import GroupNormSiLU  # noqa: E402
from jdm_fast.training.config import get_preset  # noqa: E402

GN_FLOOR, ATTN_FLOOR = 8, 8


def _group_norm_shapes(preset: str) -> set[tuple[int, int]]:
    """(channels per group, H*W) of every GroupNormSiLU call of the preset's UNet forward."""
    cfg = get_preset(preset).model.unet
    unet = UNet(cfg).eval()
    seen = set()

    def hook(module, args):
        x = args[0]
        seen.add((x.shape[1] // module.num_groups, x[0, 0].numel()))

    for m in unet.modules():
        if isinstance(m, GroupNormSiLU):
            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        unet(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long))
    return seen


def test_picked_configs_have_no_spills_and_keep_occupancy():
    gn_configs = {group_norm.ALL_CONFIGS.index(group_norm.pick_config(cg, hw))
                  for preset in ("digits", "cifar10") for cg, hw in _group_norm_shapes(preset)}
    attn_configs = {attention.ALL_CONFIGS.index(attention.pick_config(256, d)) for d in (32, 64, 128)}
    jobs = [("jdm_fast.kernels.group_norm", kind, i, dt, cap, {}) for cap in (90, 80) for dt in ("bf16", "fp32")
            for i in sorted(gn_configs) for kind in ("fwd", "bwd")]
    jobs += [("jdm_fast.kernels.attention", kind, i, dt, cap, {}) for cap in (90, 80) for dt in ("bf16", "fp16")
             for i in sorted(attn_configs) for kind in attention.KERNEL_KINDS]
    records = kr.resources(jobs)
    assert len(records) == len(jobs)
    errors = [(r["kind"], r["config"], r["dtype"], r["cap"], r["error"]) for r in records if "error" in r]
    assert not errors, errors[:3]
    spills = [(r["module"], r["kind"], r["config"], r["dtype"], r["arch"], r["spill_stores"], r["spill_loads"])
              for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spills, spills
    for r in records:
        floor = GN_FLOOR if r["module"] == "group_norm" else ATTN_FLOOR
        assert r["warps_per_sm"] >= floor, (r["module"], r["kind"], r["config"], r["dtype"], r["arch"],
                                            r["registers"], r["shared"], r["warps_per_sm"], r["limited_by"])


@pytest.mark.parametrize("cap,regs,warps,shared,expected", [
    (90, 24, 4, 0, (64, "warps")),  # 16 blocks of 4 warps fill the 64 warps
    (90, 128, 4, 0, (16, "registers")),  # 128 x 32 x 4 = 16,384 registers a block: 4 blocks
    (90, 208, 4, 33280, (8, "registers")),  # 208 -> 6,656 a warp: 65,536 / 26,624 = 2 blocks
    (80, 40, 4, 100 * 1024, (4, "shared memory")),  # 163 KiB holds one 100 KiB block
    (90, 16, 1, 0, (32, "blocks")),  # one-warp programs: the 32-block limit
])
def test_occupancy_arithmetic(cap, regs, warps, shared, expected):
    assert kr.occupancy(cap, regs, warps, shared) == expected
