"""Presets and the frozen training configuration that the CLI resolves and writes as config.json."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

import torch

from jdm_fast.diffusion import SAMPLERS
from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.joint import JointConfig

COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


def _device_ok(name: str) -> bool:
    return name in ("auto", "cpu", "cuda") or bool(re.fullmatch(r"cuda:\d+", name))


def check_device(name: str) -> torch.device:
    """``--device`` of the CLIs as a torch.device, or a ValueError naming what is wrong."""
    if not _device_ok(name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. ``model`` carries the UNet, head and joint-loss settings."""

    preset: str
    dataset: str
    model: JointConfig
    num_timesteps: int = 1000
    schedule: str = "jdm_linear"
    data_dir: str | None = None
    out: str = "runs/default"
    steps: int = 1000
    batch_size: int = 64  # global batch
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_decay: float = 0.9999
    amp: bool = False
    compile: bool | None = None  # None = auto (on for CUDA, off on CPU)
    compile_mode: str = "default"  # torch.compile mode (COMPILE_MODES)
    channels_last: bool | None = None  # None = auto: on (CUDA, and CPUs: measured faster, README)
    augment: bool = True  # classifier-input augmentation
    labelled_fraction: float = 1.0
    loader: str = "auto"
    optimizer: str = "adamw"  # or "apex" (apex FusedAdam, when installed)
    eval_every: int = 500
    save_every: int = 500
    log_every: int = 50
    sampler: str = "ancestral"  # sampler of the preview grids: ancestral (respaced) or ddim
    sample_steps: int = 100  # its number of steps
    num_samples: int = 64
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    max_nonfinite: int = 5  # consecutive steps with a non-finite loss (each one skipped) before the run stops
    tensorboard: bool = False  # also log metrics and sample grids to <out>/tb/ (needs the tensorboard extra)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", JointConfig(**self.model))
        floats = {"--lr": self.lr, "--weight-decay": self.weight_decay, "--grad-clip": self.grad_clip,
                  "--ema-decay": self.ema_decay, "--labelled-fraction": self.labelled_fraction}
        for flag, value in floats.items():  # NaN passes every comparison: name it first
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
        checks = [
            (self.num_timesteps >= 1, f"--num-timesteps must be >= 1, got {self.num_timesteps}"),
            (0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}"),
            (_device_ok(self.device), f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.grad_clip is None or self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}"),
            (0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (0.0 < self.labelled_fraction <= 1.0,
             f"--labelled-fraction must be in (0, 1], got {self.labelled_fraction}"),
            (self.compile_mode in COMPILE_MODES,
             f"--compile-mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}"),
            (self.optimizer in ("adamw", "apex"), f"--optimizer must be adamw or apex, got {self.optimizer!r}"),
            (min(self.eval_every, self.save_every, self.log_every) >= 1,
             "--eval-every, --save-every and --log-every must be >= 1"),
            (1 <= self.sample_steps <= self.num_timesteps,
             f"--sample-steps must be in [1, {self.num_timesteps}], got {self.sample_steps}"),
            (self.sampler in SAMPLERS, f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}"),
            (self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}"),
            (self.max_nonfinite >= 1, f"--max-nonfinite must be >= 1, got {self.max_nonfinite}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _joint(unet: UNetConfig, num_classes: int = 10, head_dropout: float = 0.7, lam: float = 1e-3,
           classifier_input: str = "x0") -> JointConfig:
    return JointConfig(unet=unet, head=HeadConfig(num_classes=num_classes, dropout=head_dropout),
                       classifier_weight=lam, classifier_input=classifier_input)


_CIFAR_UNET = UNetConfig(image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                         num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4, dropout=0.3)
_PAPER = dict(schedule="jdm_linear", lr=1e-4, ema_decay=0.9999, eval_every=5000, save_every=5000,
              log_every=100, sample_steps=250)

# The default preset: a small model on the 5,000 embedded MNIST digits that trains on a 2-core CPU
# in under 10 minutes. Its settings were tuned for that budget (see README); the others are the
# paper's configurations (PAPER.md). Its head is trained on clean x0 AND on x_t
# (classifier_input "both"): the noise-aware head that `sample --mode guided` steers with (README).
PRESETS: dict[str, TrainConfig] = {
    "digits": TrainConfig(
        preset="digits", dataset="digits",
        model=_joint(UNetConfig(image_size=28, in_channels=1, model_channels=32, channel_mult=(1, 2, 2),
                                num_res_blocks=1, attention_resolutions=(7,), num_heads=None,
                                num_head_channels=32, dropout=0.0, num_groups=8),
                     head_dropout=0.3, lam=1e-3, classifier_input="both"),
        num_timesteps=500, schedule="jdm_linear", steps=600, batch_size=64, lr=1e-3, warmup_steps=100,
        grad_clip=1.0, ema_decay=0.995, eval_every=300, save_every=100, log_every=25, sample_steps=100,
        num_samples=36, out="runs/digits",
    ),
    # A minimal model for smoke tests and CI (a few seconds per run on a CPU; it learns little).
    "tiny": TrainConfig(
        preset="tiny", dataset="digits",
        model=_joint(UNetConfig(image_size=28, in_channels=1, model_channels=8, channel_mult=(1, 2),
                                num_res_blocks=1, attention_resolutions=(), num_heads=1, dropout=0.1,
                                num_groups=4),
                     head_dropout=0.3, lam=1e-2),
        num_timesteps=50, schedule="jdm_linear", steps=20, batch_size=16, lr=1e-3, warmup_steps=2,
        grad_clip=1.0, ema_decay=0.9, eval_every=1000, save_every=10, log_every=5, sample_steps=2,
        num_samples=4, out="runs/tiny",
    ),
    "cifar10": TrainConfig(preset="cifar10", dataset="cifar10", model=_joint(_CIFAR_UNET, 10),
                           steps=500_000, batch_size=256, out="runs/cifar10", **_PAPER),
    "cifar100": TrainConfig(preset="cifar100", dataset="cifar100", model=_joint(_CIFAR_UNET, 100),
                            steps=500_000, batch_size=256, out="runs/cifar100", **_PAPER),
    "svhn": TrainConfig(preset="svhn", dataset="svhn", model=_joint(_CIFAR_UNET, 10),
                        steps=250_000, batch_size=256, out="runs/svhn", **_PAPER),
    "fashionmnist": TrainConfig(
        preset="fashionmnist", dataset="fashionmnist",
        model=_joint(UNetConfig(image_size=28, in_channels=1, model_channels=64, channel_mult=(1, 2, 2),
                                num_res_blocks=3, attention_resolutions=(14, 7), num_heads=4, dropout=0.3)),
        num_timesteps=500, steps=100_000, batch_size=128, out="runs/fashionmnist", **_PAPER,
    ),
}
DEFAULT_PRESET = "digits"


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
