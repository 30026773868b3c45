"""UNet, classifier head and the joint loss."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from _compare import assert_same_losses_and_grads, one_thread, perturb_zero_params
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.joint import BatchKey, JointConfig, JointDiffusion
from jdm_fast.models.unet import UNet
from jdm_fast.training.config import PRESETS

TINY = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, dropout=0.0, num_groups=4)


def tiny_joint(**kw) -> JointDiffusion:
    cfg = JointConfig(unet=kw.pop("unet", TINY), head=kw.pop("head", HeadConfig(num_classes=3, dropout=0.0)), **kw)
    return JointDiffusion(cfg, GaussianDiffusion(make_betas("jdm_linear", 100)))


def expected_feature_channels(cfg: UNetConfig) -> int:
    """Closed form: input conv + every res block + every downsample + middle, in channels."""
    base, mults = cfg.model_channels, cfg.channel_mult
    blocks = sum(cfg.num_res_blocks * base * m for m in mults)
    downs = sum(base * m for m in mults[:-1])
    return base + blocks + downs + base * mults[-1]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_run(name):
    cfg = PRESETS[name].model
    model = JointDiffusion(cfg, GaussianDiffusion(make_betas("linear", 100)))
    assert model.head.in_features == expected_feature_channels(cfg.unet) == model.unet.feature_channels
    u = cfg.unet
    x = torch.randn(2, u.in_channels, u.image_size, u.image_size)
    t = torch.tensor([0, 9])
    with torch.no_grad():
        assert model.unet(x, t).shape == x.shape
        model.eval()
        assert model.classify(x).shape == (2, cfg.head.num_classes)


def test_cifar_preset_matches_the_paper():
    cfg = PRESETS["cifar10"].model
    model = JointDiffusion(cfg, GaussianDiffusion(make_betas("linear", 100)))
    assert model.head.in_features == 3712  # PAPER.md: F = 3712 for the CIFAR config
    assert 59.0e6 < n_params(model) < 60.0e6  # "about 59.5M parameters with the head"
    head = model.head.net
    assert head[2].out_features == 3712 // 2 and head[-1].out_features == 10
    assert head[0].p == 0.7


def test_unet_works_at_64x64_and_feature_size_follows_config():
    cfg = UNetConfig(image_size=64, in_channels=3, model_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                     attention_resolutions=(16, 8), num_heads=None, num_head_channels=32, dropout=0.0)
    unet = UNet(cfg)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        enc = unet.encode(x, torch.tensor([5]))
        assert unet.decode(*enc).shape == x.shape
    assert sum(s.shape[1] for s in enc.skips) + enc.h.shape[1] == unet.feature_channels == expected_feature_channels(cfg)
    assert [s.shape[-1] for s in enc.skips] == [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8]
    assert UNet.features(enc).shape == (1, unet.feature_channels)


def test_decode_of_encode_is_forward_and_features_are_pooled():
    torch.manual_seed(0)
    model = tiny_joint()
    for p in model.unet.parameters():  # zero-initialised convs would hide a wrong wiring
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 50, 99])
    enc = model.unet.encode(x, t)
    torch.testing.assert_close(model.unet.decode(*enc), model.unet(x, t))
    feats = UNet.features(enc)
    ref = torch.cat([s.mean((2, 3)) for s in enc.skips] + [enc.h.mean((2, 3))], 1)
    torch.testing.assert_close(feats, ref)
    # the decoder really uses the skips: changing one changes eps
    skips = list(enc.skips)
    skips[0] = skips[0] + 1.0
    assert not torch.allclose(model.unet.decode(enc.h, skips, enc.emb), model.unet(x, t))


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="divisible by 2"):
        dataclasses.replace(TINY, image_size=6, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="attention_resolutions"):
        dataclasses.replace(TINY, attention_resolutions=(3,))
    with pytest.raises(ValueError, match="num_groups"):
        dataclasses.replace(TINY, model_channels=6)
    model = tiny_joint()
    with pytest.raises(ValueError, match=r"x must be \(B, 1, 8, 8\)"):
        model.unet(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="classifier_input"):
        JointConfig(unet=TINY, head=HeadConfig(), classifier_input="noisy")


def test_joint_loss_terms_against_independent_computation():
    torch.manual_seed(0)
    model = tiny_joint(classifier_weight=0.25).eval()  # eval: no dropout, BN running stats
    for p in model.unet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 2, 1, 2])
    t, noise = torch.tensor([0, 10, 50, 99]), torch.randn(4, 1, 8, 8)
    losses = model(x0, y, t=t, noise=noise)
    d = model.diffusion
    abar = d.alphas_cumprod[t].float().reshape(4, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(losses.diffusion, ((model.unet(x_t, t) - noise) ** 2).mean())
    logits = model.classify(x0)
    torch.testing.assert_close(losses.classifier, F.cross_entropy(logits, y))
    torch.testing.assert_close(losses.total, losses.diffusion + 0.25 * losses.classifier)
    assert losses.labelled.item() == 4 and losses.correct.item() == (logits.argmax(1) == y).sum().item()


@pytest.mark.parametrize("preset", ["tiny", "digits"])
def test_one_encoder_call_equals_two(preset):
    """The default joint loss encodes [x_t ; x0] at [t ; 0] in one call: loss terms and every
    gradient equal the two-call path's (fp32, relative 1e-5), in training mode with the head's
    BatchNorm on batch statistics and keyed UNet dropout (p = 0.3: each pass draws its own masks,
    the same in one call or two)."""
    cfg = PRESETS[preset].model
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, dropout=0.3))
    diffusion = GaussianDiffusion(make_betas("jdm_linear", 100))
    torch.manual_seed(0)
    one = JointDiffusion(cfg, diffusion).train()
    perturb_zero_params(one)
    two = JointDiffusion(dataclasses.replace(cfg, fuse_encoder_passes=False), diffusion).train()
    two.load_state_dict(one.state_dict())
    u = cfg.unet
    x0 = torch.rand(6, u.in_channels, u.image_size, u.image_size) * 2 - 1
    y = torch.tensor([0, 3, -1, 9, 2, 2])
    key = BatchKey(3, 5, 0, 6, 5)
    with one_thread():
        assert_same_losses_and_grads(one, one(x0, y, key=key), two, two(x0, y, key=key))


@pytest.mark.parametrize("channels_last", [False, True])
def test_keyed_unet_dropout_masks_follow_the_philox_reference(channels_last):
    """With a DropoutKey a ResBlock keeps element (c, y, x) of row r of stream s exactly when the NumPy
    Philox reference's uniform (row first + r, tag UNET + 2 k + s, column (y W + x) C + c) is >= p, and
    scales kept elements by 1 / (1 - p); the same in either memory layout; no global RNG is read.
    Without a key (or in eval mode) it is torch's Dropout."""
    from jdm_fast.models.unet import _DROPOUT_TAG, DropoutKey, ResBlock
    from jdm_fast.ops.philox import counter_uniform as reference_uniform
    p, rows, c, hw = 0.3, 3, 4, 5
    block = ResBlock(c, c, 8, p, False, 2).train()
    block.dropout_index = 7
    h = torch.rand(2 * rows, c, hw, hw) + 0.5  # no zeros: a zero in the output is a dropped element
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    first = torch.tensor(11)
    state = torch.get_rng_state()
    out = block._dropout(h, DropoutKey(first, 42, rows, (0, 1)))
    assert torch.equal(torch.get_rng_state(), state)
    for s in (0, 1):
        u = reference_uniform(42, _DROPOUT_TAG + 2 * 7 + s, 11, rows, hw * hw * c)  # (rows, H*W*C)
        keep = torch.from_numpy(u.reshape(rows, hw, hw, c) >= p).permute(0, 3, 1, 2)
        part, x = out[s * rows:(s + 1) * rows], h[s * rows:(s + 1) * rows]
        assert torch.equal(part != 0, keep)
        torch.testing.assert_close(part[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)
    assert 0.1 < (out == 0).float().mean().item() < 0.5  # 120 draws at p = 0.3
    with pytest.raises(ValueError, match="dropout key covers 2 x 3 rows, the batch has 4"):
        block._dropout(h[:4], DropoutKey(first, 42, rows, (0, 1)))
    torch.manual_seed(0)
    unkeyed = block._dropout(h, None)
    torch.manual_seed(0)
    assert torch.equal(unkeyed, torch.nn.functional.dropout(h, p, training=True))
    assert torch.equal(block.eval()._dropout(h, DropoutKey(first, 42, rows, (0, 1))), h)


@pytest.mark.parametrize("fuse", [True, False])
def test_classifier_reads_x_cls_and_the_diffusion_term_the_clean_x0(fuse):
    """forward(x0, y, ..., x_cls=augmented copy): the classifier term is that of x_cls at t = 0, the
    diffusion term that of x0 (unchanged by x_cls); the model draws no augmentation of its own."""
    torch.manual_seed(0)
    model = tiny_joint(classifier_weight=0.5, fuse_encoder_passes=fuse).eval()
    for p in model.unet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    x_cls = x0.flip(-1).roll(1, dims=-2)
    y = torch.tensor([0, 2, 1, 2])
    t, noise = torch.tensor([3, 10, 50, 99]), torch.randn(4, 1, 8, 8)
    state = torch.get_rng_state()
    with torch.no_grad():
        plain = model(x0, y, t=t, noise=noise)
        aug = model(x0, y, t=t, noise=noise, x_cls=x_cls)
        assert torch.equal(torch.get_rng_state(), state)
        expected = F.cross_entropy(model.classify(x_cls), y)
        keyed = model.train()(x0, y, key=BatchKey(1, 2, 0, 4, 4), x_cls=x_cls)  # (head BN on batch statistics)
        keyed_plain = model(x0, y, key=BatchKey(1, 2, 0, 4, 4))
    torch.testing.assert_close(aug.diffusion, plain.diffusion, rtol=1e-6, atol=0)
    torch.testing.assert_close(aug.classifier, expected)
    assert not torch.allclose(aug.classifier, plain.classifier)
    torch.testing.assert_close(keyed.diffusion, keyed_plain.diffusion, rtol=1e-6, atol=0)
    assert not torch.allclose(keyed.classifier, keyed_plain.classifier)
    assert not hasattr(model, "augment")


def test_x_cls_is_checked():
    model = tiny_joint()
    x0, y = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([0, 1])
    with pytest.raises(ValueError, match="x_cls must have x0's shape"):
        model(x0, y, x_cls=x0[:1])
    with pytest.raises(ValueError, match="classifier_input is 'xt'"):
        tiny_joint(classifier_input="xt")(x0, y, x_cls=x0)
    tiny_joint(classifier_input="both")(x0, y, x_cls=x0)  # accepted


def test_classifier_on_noisy_input_uses_the_diffusion_pass():
    torch.manual_seed(0)
    model = tiny_joint(classifier_input="xt").eval()
    x0, y = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2])
    t, noise = torch.tensor([5, 60, 90]), torch.randn(3, 1, 8, 8)
    losses = model(x0, y, t=t, noise=noise)
    logits = model.logits(model.unet.encode(model.diffusion.q_sample(x0, t, noise), t))
    torch.testing.assert_close(losses.classifier, F.cross_entropy(logits, y))


def test_classifier_on_both_inputs_sums_the_two_cross_entropies():
    """classifier_input "both": CE of the head on x_cls at t = 0 plus CE on x_t's features at t,
    from separate encoder passes; accuracy counts the t = 0 pass only; in training the
    head's BatchNorm sees both halves in one batch."""
    torch.manual_seed(0)
    model = tiny_joint(classifier_input="both").eval()
    x0, y = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2])
    x_cls = torch.roll(x0, 1, dims=3)
    t, noise = torch.tensor([5, 60, 90]), torch.randn(3, 1, 8, 8)
    losses = model(x0, y, t=t, noise=noise, x_cls=x_cls)
    x_t = model.diffusion.q_sample(x0, t, noise)
    clean = model.classify(x_cls)
    noisy = model.logits(model.unet.encode(x_t, t))
    torch.testing.assert_close(losses.classifier, F.cross_entropy(clean, y) + F.cross_entropy(noisy, y))
    assert losses.correct.item() == (clean.argmax(1) == y).sum().item() and losses.labelled.item() == 3
    model.train()
    bn = model.head.net[1]
    before = bn.running_mean.clone()
    model(x0, y, t=t, noise=noise, x_cls=x_cls)
    feats = torch.cat([model.unet.features(model.unet.encode(x_cls, torch.zeros_like(t))),
                       model.unet.features(model.unet.encode(x_t, t))])
    torch.testing.assert_close(bn.running_mean, (1 - bn.momentum) * before + bn.momentum * feats.mean(0))


def test_semi_supervised_unlabelled_examples_add_only_diffusion():
    torch.manual_seed(0)
    model = tiny_joint().eval()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([1, -1, 2, -1])
    logits = model.classify(x0)
    loss, correct, labelled = model.classifier_loss(logits, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits[[0, 2]], y[[0, 2]]))
    assert labelled.item() == 2
    none = model(x0, torch.full((4,), -1))
    assert none.classifier.item() == 0.0 and none.labelled.item() == 0
    torch.testing.assert_close(none.total, none.diffusion)


def test_multi_label_uses_bce_on_labelled_rows():
    model = tiny_joint(head=HeadConfig(num_classes=3, dropout=0.0, multi_label=True)).eval()
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    y = torch.tensor([[1.0, 0.0, 1.0], [-1.0, -1.0, -1.0], [0.0, 1.0, 0.0]])
    logits = model.classify(x0)
    loss, _, labelled = model.classifier_loss(logits, y)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[[0, 2]], y[[0, 2]]))
    assert labelled.item() == 2
    with pytest.raises(ValueError, match="multi-label targets"):
        model.classifier_loss(logits, torch.tensor([0, 1, 2]))


def test_classifier_loss_reaches_the_encoder_only():
    torch.manual_seed(0)
    model = tiny_joint()
    losses = model(torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0]))
    losses.classifier.backward()
    enc_grad = model.unet.input_conv.weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.unet.up.parameters())
    assert model.unet.out_conv.weight.grad is None or model.unet.out_conv.weight.grad.abs().sum() == 0


def test_tiny_model_overfits_a_small_batch():
    """Both losses fall on a fixed batch (evaluated on a fixed set of t and noise)."""
    torch.manual_seed(0)
    model = tiny_joint(classifier_weight=1.0)
    x0 = (torch.rand(6, 1, 8, 8) > 0.5).float() * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t_eval, n_eval = torch.randint(0, 100, (64,)), torch.randn(64, 1, 8, 8)
    x_eval, y_eval = x0.repeat(11, 1, 1, 1)[:64], y.repeat(11)[:64]

    def eval_losses():
        model.eval()
        with torch.no_grad():
            out = model(x_eval, y_eval, t=t_eval, noise=n_eval)
        model.train()
        return out.diffusion.item(), out.classifier.item()

    d0, c0 = eval_losses()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x0, y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    d1, c1 = eval_losses()
    assert d1 < 0.5 * d0, (d0, d1)
    assert c1 < 0.3 * c0, (c0, c1)


def test_kernels_install_as_a_subpackage_only(tmp_path):
    """setup.py maps kernels/ to jdm_fast.kernels; no top-level ``kernels`` module is installed."""
    import subprocess
    import sys

    code = ("import importlib.util, jdm_fast.kernels; "
            "assert importlib.util.find_spec('kernels') is None, 'top-level kernels module installed'")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
