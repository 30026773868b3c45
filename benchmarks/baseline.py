"""The plain-PyTorch baseline: the same ADM UNet, classifier head and joint loss as
``jdm_fast.models.JointDiffusion``, written with stock torch modules only.

nn.GroupNorm + F.silu where we fuse GroupNorm/FiLM/SiLU, F.scaled_dot_product_attention where we
run our attention kernels, q_sample/MSE/CE in plain tensor math where we use fused noise ops. It
imports nothing from jdm_fast, so the speed-up of our kernels is measured, not assumed. The
parameter names match ``JointDiffusion.state_dict()`` key for key (tests/test_baseline.py checks
that weights load both ways and that eps, logits and the joint loss agree).

``cfg`` is a ``jdm_fast.models.JointConfig`` (or anything with the same attributes);
``alphas_cumprod`` is the (T,) schedule table (``GaussianDiffusion.alphas_cumprod``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, scale_shift: bool, groups: int):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_norm = nn.GroupNorm(groups, in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch)
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        e = self.emb(F.silu(emb)).to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        else:
            h = self.out_norm(h + e[:, :, None, None])
        return self.skip(x) + self.out_conv(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """GroupNorm -> 1x1 qkv -> SDPA -> 1x1 proj -> residual (same parameters as SelfAttention2d).

    An NCHW input pays one copy of q, k, v into SDPA's layout; a channels-last input (the
    ``baseline_strong`` variant of benchmarks/train_bench.py) takes a copy-free path."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return x + self._attend_channels_last(x)
        b, c, *spatial = x.shape
        seq = x.reshape(b, c, -1)
        length, h = seq.shape[-1], self.num_heads
        qkv = self.qkv(self.norm(seq)).reshape(b, 3, h, c // h, length)
        # SDPA's fused kernels want a unit last-dim stride: one copy into (3, B, H, L, D).
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, length)).reshape(b, c, *spatial)

    def _attend_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The block's update for a channels-last map, with no copy of q, k, v: in memory a
        channels-last (B, C, H, W) map is a contiguous (B, L, C) token matrix, so the 1x1 convs are
        linear layers on a view of it, and q, k, v are (B, H, L, D) views of the (B, L, 3C) qkv
        projection with a unit head-dim stride (what SDPA's fused kernels read). SDPA's fused
        kernels write a token-major output, so merging the heads is a view too; the projection comes
        back as a channels-last view. Same parameters and math as the NCHW path."""
        b, c, height, width = x.shape
        heads = self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C), a view when the norm keeps the layout
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, L, 3C): [q | k | v], heads inside
        q, k, v = (t.unflatten(-1, (heads, c // heads)).transpose(1, 2) for t in qkv.split(c, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)  # (B, L, C)
        out = F.linear(out, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return out.transpose(1, 2).unflatten(2, (height, width))  # (B, C, H, W), channels-last strides


class Block(nn.Module):
    def __init__(self, res: ResBlock, attn: nn.Module | None = None, up: nn.Module | None = None):
        super().__init__()
        self.res, self.attn, self.up = res, attn, up

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.up is not None:
            x = self.up(x)
        return x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        base, emb_ch, groups = cfg.model_channels, 4 * cfg.model_channels, cfg.num_groups

        def heads(ch: int) -> int:
            return cfg.num_heads if cfg.num_heads is not None else ch // cfg.num_head_channels

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_ch, cfg.dropout, cfg.use_scale_shift_norm, groups)

        def attn(ch: int, size: int) -> nn.Module | None:
            return Attention(ch, heads(ch), groups) if size in cfg.attention_resolutions else None

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
        self.middle = nn.ModuleList([res(ch, ch), Attention(ch, heads(ch), groups), res(ch, ch)])
        self.feature_channels = sum(skip_chs) + ch
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                upsample = level > 0 and i == cfg.num_res_blocks
                self.up.append(Block(res(ch + skip_chs.pop(), base * mult), attn(base * mult, size),
                                     Upsample(base * mult) if upsample else None))
                ch = base * mult
                size *= 2 if upsample else 1
        self.out_norm = nn.GroupNorm(groups, ch)
        self.out_conv = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def encode(self, x: torch.Tensor, t: torch.Tensor):
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        res1, mid_attn, res2 = self.middle
        return res2(mid_attn(res1(h, emb)), emb), skips, emb

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        for block, skip in zip(self.up, reversed(skips)):
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))

    @staticmethod
    def features(h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([s.float().mean(dim=(2, 3)) for s in skips] + [h.float().mean(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x, t))


class ClassifierHead(nn.Module):
    def __init__(self, in_features: int, cfg):
        super().__init__()
        hidden = in_features // 2
        self.net = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.BatchNorm1d(in_features), nn.Linear(in_features, hidden),
            nn.LeakyReLU(0.01), nn.Dropout(cfg.dropout), nn.BatchNorm1d(hidden), nn.Linear(hidden, cfg.num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


class BaselineJoint(nn.Module):
    """UNet + head + joint loss ``mse(eps_hat, eps) + lambda * CE(head(features(encode(x0, 0))), y)``
    (classifier_input "xt": the head on x_t's features; "both": the two CEs summed).

    ``forward`` returns ``(total, diffusion, classifier)``; labels < 0 count as unlabelled, as in
    ``JointDiffusion``. No augmentation (the benchmarks run both models without it).
    """

    def __init__(self, cfg, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.config = cfg
        self.unet = UNet(cfg.unet)
        self.head = ClassifierHead(self.unet.feature_channels, cfg.head)
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        # non-persistent: state_dict keys stay those of JointDiffusion
        self.register_buffer("sqrt_abar", abar.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1.0 - abar).sqrt(), persistent=False)
        self.num_timesteps = abar.numel()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_abar[t].to(x0.dtype).reshape(shape)
        s = self.sqrt_one_minus_abar[t].to(x0.dtype).reshape(shape)
        return a * x0 + s * noise

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        h, skips, _ = self.unet.encode(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return self.head(self.unet.features(h, skips))

    def classifier_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.config.head.multi_label:
            mask = (y >= 0).all(dim=1)
            per = F.binary_cross_entropy_with_logits(logits, y.clamp_min(0).float(), reduction="none").mean(dim=1)
        else:
            mask = y >= 0
            per = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
        return (per * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        h, skips, emb = self.unet.encode(self.q_sample(x0, t, noise), t)
        diffusion = F.mse_loss(self.unet.decode(h, skips, emb).float(), noise.float())
        if self.config.classifier_input == "xt":
            cls = self.classifier_loss(self.head(self.unet.features(h, skips)), y)
        elif self.config.classifier_input == "both":  # the head on [x0 features ; x_t features], CEs summed
            h0, skips0, _ = self.unet.encode(x0, torch.zeros_like(t))
            logits = self.head(torch.cat([self.unet.features(h0, skips0), self.unet.features(h, skips)]))
            cls = self.classifier_loss(logits[:x0.shape[0]], y) + self.classifier_loss(logits[x0.shape[0]:], y)
        else:
            cls = self.classifier_loss(self.classify(x0), y)
        return diffusion + self.config.classifier_weight * cls, diffusion, cls
