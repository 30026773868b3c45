"""Model configuration: explicit frozen dataclasses, validated at construction."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    """ADM UNet hyper-parameters (PAPER.md). ``attention_resolutions`` are feature-map sizes in pixels."""

    image_size: int = 32
    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int | None = 4
    num_head_channels: int | None = None
    dropout: float = 0.3
    use_scale_shift_norm: bool = True
    num_groups: int = 32

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists: normalise so configs compare equal.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.image_size < 1 or self.in_channels < 1 or self.model_channels < 1:
            raise ValueError(f"UNetConfig: image_size, in_channels, model_channels must be >= 1: {self}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig: channel_mult must be non-empty positive ints, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig: num_res_blocks must be >= 1, got {self.num_res_blocks}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"UNetConfig: image_size={self.image_size} must be divisible by 2**(len(channel_mult)-1)"
                f"={factor} (one downsample per level after the first)"
            )
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("UNetConfig: give exactly one of num_heads and num_head_channels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig: dropout must be in [0, 1), got {self.dropout}")
        for m in self.channel_mult:
            if (self.model_channels * m) % self.num_groups:
                raise ValueError(
                    f"UNetConfig: channels {self.model_channels * m} not divisible by num_groups={self.num_groups}"
                )
        sizes = self.resolutions()
        bad = [r for r in self.attention_resolutions if r not in sizes]
        if bad:
            raise ValueError(
                f"UNetConfig: attention_resolutions {bad} are not feature-map sizes of this UNet {sizes}"
            )

    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, from the input down."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))


@dataclass(frozen=True)
class HeadConfig:
    """Classifier head: Dropout -> BN -> Linear(F, F/2) -> LeakyReLU -> Dropout -> BN -> Linear(F/2, K)."""

    num_classes: int = 10
    dropout: float = 0.7
    multi_label: bool = False

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"HeadConfig: num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HeadConfig: dropout must be in [0, 1), got {self.dropout}")
