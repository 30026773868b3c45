"""ADM UNet (Dhariwal & Nichol) with an explicit encoder / middle / decoder split.

``encode(x, t)`` returns the middle output, every skip tensor and the timestep embedding;
``decode`` takes them back. The joint model's classifier reads ``features(encoded)``: every skip
tensor (input conv, each ResBlock(+attention) block, each Downsample) and the middle output,
global-average-pooled and concatenated; its size ``feature_channels`` follows from the config.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from jdm_fast.models.config import UNetConfig
from jdm_fast.nn import GroupNormSiLU, SelfAttention2d
from jdm_fast.nn.layout import cat_channels, spatial_mean, split_batch
from jdm_fast.ops import noise as noise_ops

_DROPOUT_TAG = 0x554E4554  # "UNET": ResBlock k's dropout, stream s uses Philox tag _DROPOUT_TAG + 2 k + s


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half); (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class DropoutKey(NamedTuple):
    """Counter-based dropout masks for a batch of ``len(streams)`` stacked blocks of ``rows``
    examples: row r of block i is global example ``first + r`` (``first`` an int64 device tensor)
    and draws from stream ``streams[i]`` of ``seed`` (the joint loss: stream 0 for the diffusion
    pass on x_t, 1 for the classifier pass on x0, so one fused encoder call and two separate ones
    get the same masks). Element (c, y, x) of an example is kept when its uniform, taken in
    (y, x, c) order, is >= p: the same mask in either memory layout, on every device and number of
    processes, and at every rerun of a step."""
    first: torch.Tensor
    seed: int
    rows: int
    streams: tuple[int, ...]


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN+SiLU -> conv -> (+emb, or FiLM scale-shift inside the second GN) -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, scale_shift: bool, groups: int):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_norm = GroupNormSiLU(groups, in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch)
        self.out_norm = GroupNormSiLU(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.dropout_index = 0  # this block's place among the UNet's ResBlocks (its Philox tags)
        self.out_conv = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _dropout(self, h: torch.Tensor, key: DropoutKey | None) -> torch.Tensor:
        p = self.dropout.p
        if key is None or not self.training or p == 0:
            return self.dropout(h)  # torch's global RNG (training without a key) or the identity
        if h.shape[0] != key.rows * len(key.streams):
            raise ValueError(f"dropout key covers {len(key.streams)} x {key.rows} rows, the batch has {h.shape[0]}")
        b, c, hgt, wid = h.shape
        tag = _DROPOUT_TAG + 2 * self.dropout_index
        # Philox draws ~3.5x faster than bernoulli_ on a CPU (the CIFAR preset's dropout: ~200 ms a step)
        keep = [noise_ops.counter_uniform(key.first, key.seed, tag + s, key.rows, hgt * wid * c) >= p
                for s in key.streams]
        keep = (keep[0] if len(keep) == 1 else torch.cat(keep)).view(b, hgt, wid, c).permute(0, 3, 1, 2)
        return torch.where(keep, h, 0) * (1.0 / (1.0 - p))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, key: DropoutKey | None = None) -> torch.Tensor:
        h = self.in_conv(self.in_norm(x))
        e = self.emb(F.silu(emb)).to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h, scale, shift)
        else:
            h = self.out_norm(h + e[:, :, None, None])
        return self.skip(x) + self.out_conv(self._dropout(h, key))


class Block(nn.Module):
    """ResBlock, then self-attention if this resolution has it, then (decoder only) upsampling."""

    def __init__(self, res: ResBlock, attn: nn.Module | None = None, up: nn.Module | None = None):
        super().__init__()
        self.res, self.attn, self.up = res, attn, up

    def forward(self, x: torch.Tensor, emb: torch.Tensor, key: DropoutKey | None = None) -> torch.Tensor:
        x = self.res(x, emb, key)
        if self.attn is not None:
            x = self.attn(x)
        if self.up is not None:
            x = self.up(x)
        return x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, key: DropoutKey | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoded(NamedTuple):
    h: torch.Tensor  # middle-block output (B, C_mid, r, r)
    skips: list[torch.Tensor]  # every encoder block output, input conv first
    emb: torch.Tensor  # timestep embedding (B, 4 * model_channels)

    def split(self, b: int) -> tuple["Encoded", "Encoded"]:
        """The encodings of the first ``b`` examples and of the rest (views, no copies; each tensor's
        gradient comes back dense in its own layout, see jdm_fast.nn.layout)."""
        parts = [split_batch(t, b) for t in (self.h, *self.skips, self.emb)]
        first, rest = [p[0] for p in parts], [p[1] for p in parts]
        return Encoded(first[0], first[1:-1], first[-1]), Encoded(rest[0], rest[1:-1], rest[-1])


class UNet(nn.Module):
    """Unconditional ADM UNet predicting eps. ``forward(x, t) == decode(encode(x, t))``.

    ``decoder=False`` builds the encoder and middle block only (a classifier-only model: no
    up-path, no output layers, no parameters or compute for them); ``decode`` then raises."""

    def __init__(self, cfg: UNetConfig, decoder: bool = True):
        super().__init__()
        self.config = cfg
        self.has_decoder = decoder
        base, emb_ch, groups = cfg.model_channels, 4 * cfg.model_channels, cfg.num_groups
        heads = {"num_heads": cfg.num_heads, "num_head_channels": cfg.num_head_channels}

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_ch, cfg.dropout, cfg.use_scale_shift_norm, groups)

        def attn(ch: int, size: int) -> nn.Module | None:
            return SelfAttention2d(ch, num_groups=groups, **heads) if size in cfg.attention_resolutions else None

        self.time_embed = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_conv = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        skip_chs, ch, size = [base], base, cfg.image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Block(res(ch, base * mult), attn(base * mult, size)))
                ch = base * mult
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)
                size //= 2
        self.middle = nn.ModuleList([res(ch, ch), SelfAttention2d(ch, num_groups=groups, **heads), res(ch, ch)])
        self.feature_channels = sum(skip_chs) + ch
        self.up = nn.ModuleList()
        if not decoder:
            self.out_norm = self.out_conv = None
            self._index_dropouts()
            return
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                upsample = level > 0 and i == cfg.num_res_blocks
                self.up.append(Block(res(ch + skip_chs.pop(), base * mult), attn(base * mult, size),
                                     Upsample(base * mult) if upsample else None))
                ch = base * mult
                size *= 2 if upsample else 1
        self.out_norm = GroupNormSiLU(groups, ch)
        self.out_conv = _zero(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        self._index_dropouts()

    def _index_dropouts(self) -> None:
        for i, block in enumerate(m for m in self.modules() if isinstance(m, ResBlock)):
            block.dropout_index = i

    def _check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        cfg = self.config
        if x.dim() != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"UNet: x must be (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet: t must have shape ({x.shape[0]},), got {tuple(t.shape)}")

    @property
    def channels_last(self) -> bool:
        """Whether the model runs channels-last (``model.to(memory_format=torch.channels_last)``):
        then the input is converted at the model boundary and every feature map stays channels-last."""
        w = self.middle[0].in_conv.weight  # (C, C, 3, 3), C >= num_groups: its layout is never ambiguous
        return not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor, t: torch.Tensor, key: DropoutKey | None = None) -> Encoded:
        self._check_input(x, t)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        if self.channels_last:  # one conversion of the (few-channel) input; none inside the network
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb, key)
            skips.append(h)
        res1, mid_attn, res2 = self.middle
        h = res2(mid_attn(res1(h, emb, key)), emb, key)
        return Encoded(h, skips, emb)

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
               key: DropoutKey | None = None) -> torch.Tensor:
        if not self.has_decoder:
            raise RuntimeError("UNet.decode: this UNet was built without a decoder (a classifier-only model)")
        if len(skips) != len(self.up):
            raise ValueError(f"UNet.decode: expected {len(self.up)} skip tensors, got {len(skips)}")
        for block, skip in zip(self.up, reversed(skips)):
            h = block(cat_channels(h, skip), emb, key)
        return self.out_conv(self.out_norm(h))

    @staticmethod
    def features(enc: Encoded) -> torch.Tensor:
        """Global-average-pooled skips + middle output, concatenated: (B, feature_channels), fp32."""
        return torch.cat([spatial_mean(s) for s in enc.skips] + [spatial_mean(enc.h)], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x, t))
