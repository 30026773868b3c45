"""Sampling throughput: DDIM-50 and the ancestral sampler (100 respaced steps) of
``jdm_fast.diffusion.samplers`` (our fused step ops where they run) against the eager loops of
sampling_ref.py (plain tensor math of the same updates; tests/test_baseline.py checks they agree).

Two models: a tiny ADM UNet on CIFAR-shaped images, and ``no_model`` (eps = 0.1 x), which leaves
only the sampler's own per-step cost, where a fused step shows. ``eager`` runs first; the
``jdm_fast`` case records its ratio to it from the same session.
CPU: batch 4; GPU: batch 256.
"""
from __future__ import annotations

import pytest
import torch

import sampling_ref
import train_bench as tb
from jdm_fast.diffusion import GaussianDiffusion, make_betas, make_generator, sample_ancestral, sample_ddim
from jdm_fast.models import UNet, UNetConfig

TINY = UNetConfig(image_size=32, in_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=2, dropout=0.0, num_groups=8)
STEPS = {"ddim50": 50, "ancestral100": 100}
_seconds: dict[tuple, float] = {}


def _model_fn(kind: str, device: torch.device):
    if kind == "no_model":
        return lambda x, t: 0.1 * x
    torch.manual_seed(0)
    unet = UNet(TINY).to(device).eval()
    return unet


def _sampler(provider: str, sampler: str, model_fn, diffusion, x_T):
    steps = STEPS[sampler]
    if provider == "eager":
        if sampler == "ddim50":
            return lambda: sampling_ref.ddim(model_fn, diffusion.alphas_cumprod, x_T, steps)
        return lambda: sampling_ref.ancestral(model_fn, diffusion.alphas_cumprod, x_T, steps,
                                              generator=make_generator(0, x_T.device))
    if sampler == "ddim50":
        return lambda: sample_ddim(model_fn, diffusion, x_T.shape, steps=steps, x_T=x_T)
    return lambda: sample_ancestral(model_fn, diffusion, x_T.shape, steps=steps, x_T=x_T,
                                    generator=make_generator(0, x_T.device))


def _run(benchmark, device, batch, sampler, model, provider, rounds, warmup):
    diffusion = GaussianDiffusion(make_betas("jdm_linear", 1000)).to(device)
    x_T = torch.randn(batch, 3, 32, 32, generator=make_generator(0, device), device=device)
    sample = _sampler(provider, sampler, _model_fn(model, device), diffusion, x_T)

    def run():
        out = sample()
        tb.synchronize(device)
        return out

    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert torch.isfinite(out).all()
    seconds = benchmark.stats.stats.mean
    key = (device.type, batch, sampler, model)
    _seconds[key + (provider,)] = seconds
    eager = _seconds.get(key + ("eager",))
    benchmark.extra_info.update({
        "device": tb.device_name(device), **tb.versions(), "batch": batch, "steps": STEPS[sampler],
        "images/s": batch / seconds, "steps/s": STEPS[sampler] / seconds,
        "ratio_vs_eager": eager / seconds if eager and provider != "eager" else None,
    })


@pytest.mark.parametrize("provider", ["eager", "jdm_fast"])
@pytest.mark.parametrize("model", ["tiny_unet", "no_model"])
@pytest.mark.parametrize("sampler", list(STEPS))
def test_sampling_cpu(benchmark, sampler, model, provider):
    _run(benchmark, torch.device("cpu"), 4, sampler, model, provider, rounds=2, warmup=0)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["eager", "jdm_fast"])
@pytest.mark.parametrize("model", ["tiny_unet", "no_model"])
@pytest.mark.parametrize("sampler", list(STEPS))
def test_sampling_gpu(benchmark, cuda_device, sampler, model, provider):
    _run(benchmark, cuda_device, 256, sampler, model, provider, rounds=5, warmup=1)
