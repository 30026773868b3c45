"""The plain-PyTorch baseline of the benchmarks (benchmarks/baseline.py) computes what
JointDiffusion computes: same parameter names, same eps prediction, logits, joint loss and
gradients for identical weights and inputs. Also: the benchmarks' eager sampler loops
(benchmarks/test_sampling.py) take the same steps as jdm_fast.diffusion's samplers."""
import sys
from pathlib import Path

import pytest
import torch

from jdm_fast.diffusion import GaussianDiffusion, make_betas, sample_ancestral, sample_ddim
from jdm_fast.models import HeadConfig, JointConfig, JointDiffusion, UNetConfig
from jdm_fast.ops import backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baseline  # noqa: E402
import sampling_ref  # noqa: E402

TINY = UNetConfig(image_size=8, in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, dropout=0.0, num_groups=4)


def _pair(unet=TINY, **kw):
    cfg = JointConfig(unet=unet, head=HeadConfig(num_classes=5, dropout=0.0), classifier_weight=0.5, **kw)
    diffusion = GaussianDiffusion(make_betas("jdm_linear", 100))
    ours = JointDiffusion(cfg, diffusion)
    torch.manual_seed(0)
    with torch.no_grad():  # nothing zero-initialised: every layer must matter
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    base = baseline.BaselineJoint(cfg, diffusion.alphas_cumprod)
    base.load_state_dict(ours.state_dict(), strict=True)
    return ours, base


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_state_dict_keys_match_and_load_both_ways():
    ours, base = _pair()
    assert list(ours.state_dict()) == list(base.state_dict())
    ours.load_state_dict(base.state_dict(), strict=True)


@pytest.mark.parametrize("unet", [TINY, UNetConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
                                                   num_res_blocks=2, attention_resolutions=(8, 4), num_heads=None,
                                                   num_head_channels=8, dropout=0.0, num_groups=8,
                                                   use_scale_shift_norm=False)],
                         ids=["scale_shift", "no_scale_shift+head_channels"])
@pytest.mark.parametrize("classifier_input", ["x0", "xt", "both"])
def test_baseline_matches_joint_diffusion(unet, classifier_input):
    """Module for module: our model with the baseline's two encoder calls (the default one call
    of twice the batch equals it up to summation order: tests/test_models.py)."""
    ours, base = _pair(unet, classifier_input=classifier_input, fuse_encoder_passes=False)
    g = torch.Generator().manual_seed(1)
    b, c, s = 6, unet.in_channels, unet.image_size
    x0 = torch.rand(b, c, s, s, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 4, -1, 2, 3])  # one unlabelled example
    t = torch.tensor([0, 5, 17, 50, 98, 99])
    noise = torch.randn(b, c, s, s, generator=g)
    with backend("reference"):
        eps_ours = ours.unet(x0, t)
        logits_ours = ours.classify(x0)
        loss = ours(x0, y, t, noise)
        loss.total.backward()
    eps_base = base.unet(x0, t)
    logits_base = base.classify(x0)
    total, diffusion, cls = base(x0, y, t, noise)
    total.backward()
    assert eps_base.abs().max() > 0.1 and logits_base.abs().max() > 0.1  # non-trivial outputs
    assert _rel(eps_base, eps_ours) < 1e-5
    assert _rel(logits_base, logits_ours) < 1e-5
    for ref, got in ((loss.total, total), (loss.diffusion, diffusion), (loss.classifier, cls)):
        assert torch.isfinite(got) and abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    grads_ours = dict(ours.named_parameters())
    for name, p in base.named_parameters():
        assert _rel(p.grad, grads_ours[name].grad) < 1e-4, name


def _toy_model(x, t):
    return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1).sin()


def test_eager_sampler_loops_match_jdm_fast():
    diffusion = GaussianDiffusion(make_betas("jdm_linear", 200))
    shape = (3, 2, 5, 5)
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = sample_ddim(_toy_model, diffusion, shape, steps=20, x_T=x_t)
    ref = sampling_ref.ddim(_toy_model, diffusion.alphas_cumprod, x_t, steps=20)
    assert _rel(ref, ours) < 1e-5
    ours = sample_ancestral(_toy_model, diffusion, shape, steps=25, x_T=x_t, generator=torch.Generator().manual_seed(3))
    ref = sampling_ref.ancestral(_toy_model, diffusion.alphas_cumprod, x_t, steps=25,
                                 generator=torch.Generator().manual_seed(3))
    assert _rel(ref, ours) < 1e-5
