"""Session fixtures of the generation/metrics tests: a small joint model trained on the real
digits (about a minute on one core) and the project's feature classifier (the independent
classifier), both cached in one tmp dir per session."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.joint import JointConfig

TINY_JOINT = JointConfig(
    unet=UNetConfig(image_size=28, in_channels=1, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(), num_heads=None, num_head_channels=16, dropout=0.0, num_groups=8),
    head=HeadConfig(num_classes=10, dropout=0.1), classifier_weight=1e-2,
    classifier_input="both")  # as the digits preset: the head also trained on x_t (guided sampling reads it)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """``(checkpoint path, feature classifier)`` of a 300-step joint model (T = 100) and a CNN.

    Runs the whole generation session on ONE intra-op thread: on a loaded 2-core machine two
    OpenMP threads spin-wait on each other and the same training took over 10 minutes instead of
    about one."""
    from jdm_fast.metrics import get_feature_classifier
    from jdm_fast.training.config import get_preset
    from jdm_fast.training.loop import train

    out = tmp_path_factory.mktemp("gen_run")
    cfg = dataclasses.replace(get_preset("digits"), model=TINY_JOINT, out=str(out / "run"), steps=300,
                              num_timesteps=100, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.99,
                              eval_every=10**6, save_every=300, log_every=100, num_samples=4, sample_steps=5,
                              device="cpu", amp=False, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            train(cfg, log=lambda *_: None)
        fc = get_feature_classifier(out / "run" / "feature_classifier.pt", "digits", log=lambda *_: None)
        yield out / "run" / "checkpoint.pt", fc
    finally:
        torch.set_num_threads(threads)
