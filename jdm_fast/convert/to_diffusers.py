"""``python -m jdm_fast.convert to-diffusers CKPT --out DIR``: a trained jdm_fast model as a diffusers
pipeline folder, so that diffusers' schedulers (DDPM, DDIM, DPM-Solver++, UniPC, DEIS, ...) sample it.
Schedulers without x0 clipping (Euler, LMS) sample these pixel-space models badly, as our samplers
would without their clipping (README: measured).

CKPT is what ``jdm_fast.load_model`` reads: a training checkpoint (``checkpoint.pt``: EMA weights
by default, ``--weights raw`` for the others) or a safetensors export of the trainer
(``model_ema.safetensors`` / ``model.safetensors``). DIR gets the layout of
``DDPMPipeline.save_pretrained``::

    DIR/model_index.json        DDPMPipeline: DDPMPipeline.from_pretrained(DIR) samples the model
    DIR/unet/                   UNet2DModel (config.json + diffusion_pytorch_model.safetensors)
    DIR/scheduler/              DDPMScheduler config: our betas as trained_betas, epsilon prediction,
                                fixed-small variance, x0 clipped to [-1, 1] as our samplers do
                                (clip_sample for DDPM/DDIM; thresholding with sample_max_value 1,
                                which is the same clipping, for DPM-Solver++/UniPC/DEIS), "trailing"
                                timestep spacing (sampling starts at t = T-1, as ours does). Any
                                scheduler's from_pretrained(DIR / "scheduler") reads it.
    DIR/jdm_fast_export.json    what was exported, from which file and step, the measured check,
                                and what was left out

The UNet2DModel's noise prediction equals ours: the export is checked before it is put in place
(the written folder is loaded back and both models run on the same random inputs at timesteps
spanning [0, T); a relative difference above ``CHECK_TOLERANCE`` aborts the export). Models that
UNet2DModel cannot express exactly are refused with the reason (:class:`NotExpressible`):
``channel_mult[0] != 1`` (diffusers' input conv and timestep projection have
``block_out_channels[0]`` channels, ours ``model_channels``) and attention layers with different
head sizes (diffusers takes one ``attention_head_dim`` for every attention layer; ours fixes
``num_heads`` across levels of different widths). Classifier-only models (no decoder) have no noise
prediction to export.

The classifier head stays jdm_fast's: UNet2DModel has no place for it or for the pooled encoder
features it reads. Classify (and steer sampling) with ``jdm_fast.load_model(CKPT)``.
diffusers is not a dependency of jdm_fast: it is imported only when this subcommand runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from jdm_fast.diffusion import make_betas
from jdm_fast.diffusion.schedules import SCHEDULES
from jdm_fast.generation.loading import LoadedModel, file_kind, load_joint_model
from jdm_fast.models.config import UNetConfig
from jdm_fast.models.unet import UNet

# The export's check: max|ours - diffusers| / max|ours| of the fp32 noise prediction must not exceed
# this (measured ~1e-7..1e-6 on CPU; the tests hold 1e-5). Larger means a mapping error, not rounding.
CHECK_TOLERANCE = 1e-4
CHECK_BATCH = 4
TIMESTEP_SPACING = "trailing"  # first sampled timestep T-1, as jdm_fast's samplers
EXPORT_INFO = "jdm_fast_export.json"


class NotExpressible(ValueError):
    """The model has something diffusers' UNet2DModel cannot express exactly (the message says what)."""


def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("to-diffusers needs diffusers, which is not installed: pip install diffusers") from e
    return diffusers


# ---------------------------------------------------------------------------- the mapping
def _attention_head_dims(cfg: UNetConfig) -> dict[str, int]:
    """Head size of every attention layer of the UNet, by where it is (mirrors SelfAttention2d)."""
    dims = {}
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    where = [(f"level {i} ({size}x{size}, {widths[i]} channels)", widths[i])
             for i, size in enumerate(cfg.resolutions()) if size in cfg.attention_resolutions]
    where.append((f"middle ({widths[-1]} channels)", widths[-1]))
    for name, ch in where:
        dims[name] = cfg.num_head_channels if cfg.num_head_channels is not None else ch // cfg.num_heads
    return dims


def check_expressible(cfg: UNetConfig, *, generates: bool = True) -> None:
    """Raise :class:`NotExpressible` naming the option if UNet2DModel cannot express the noise
    prediction of ``UNet(cfg)`` exactly; ``generates=False`` (``JointConfig.objective`` "classifier":
    no decoder) is refused too."""
    if not generates:
        raise NotExpressible("objective 'classifier': a classifier-only model has no decoder, so no noise "
                             "prediction to export to diffusers")
    if cfg.channel_mult[0] != 1:
        raise NotExpressible(
            f"channel_mult[0]={cfg.channel_mult[0]} (must be 1): diffusers' UNet2DModel gives its input conv and "
            f"timestep projection block_out_channels[0] = model_channels * channel_mult[0] channels, ours have "
            f"model_channels={cfg.model_channels}")
    dims = _attention_head_dims(cfg)
    if len(set(dims.values())) > 1:
        per = ", ".join(f"{name}: {d}" for name, d in dims.items())
        raise NotExpressible(
            f"num_heads={cfg.num_heads} over attention layers of different widths gives different head sizes "
            f"({per}); diffusers' UNet2DModel takes one attention_head_dim for every attention layer (a model "
            f"trained with num_head_channels, or with attention only at equal widths, exports)")


def unet2d_config(cfg: UNetConfig) -> dict:
    """The ``UNet2DModel`` constructor arguments of the same network as ``UNet(cfg)``."""
    check_expressible(cfg)
    (head_dim,) = set(_attention_head_dims(cfg).values())
    attn = [size in cfg.attention_resolutions for size in cfg.resolutions()]
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",  # Timesteps: [cos, sin] of t * 10000^(-i/half), as ours
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embedding_dim": 4 * cfg.model_channels,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": cfg.num_groups,
        # explicit: left None, diffusers drops the middle attention's GroupNorm under scale_shift
        "attn_norm_num_groups": cfg.num_groups,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "add_attention": True,
    }


def _norm_eps(unet: UNet) -> float:
    eps = {m.eps for m in unet.modules() if isinstance(m, nn.GroupNorm)}
    if len(eps) != 1:
        raise NotExpressible(f"GroupNorm eps differs between layers ({sorted(eps)}); UNet2DModel has one norm_eps")
    return eps.pop()


def unet2d_state_dict(unet: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under UNet2DModel's names (qkv split into to_q/to_k/to_v, 1x1 Conv1d -> Linear)."""
    cfg = unet.config
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, module: nn.Module) -> None:
        for name, p in module.state_dict().items():
            out[f"{dst}.{name}"] = p.detach().clone()

    def res(dst: str, r) -> None:
        put(f"{dst}.norm1", r.in_norm)
        put(f"{dst}.conv1", r.in_conv)
        put(f"{dst}.time_emb_proj", r.emb)
        put(f"{dst}.norm2", r.out_norm)
        put(f"{dst}.conv2", r.out_conv)
        if isinstance(r.skip, nn.Conv2d):
            put(f"{dst}.conv_shortcut", r.skip)

    def attn(dst: str, a) -> None:
        put(f"{dst}.group_norm", a.norm)
        # qkv output channels are (3, heads, head_dim): q, k, v each head-major, as diffusers' to_q/k/v
        w, b = a.qkv.weight.detach()[..., 0], a.qkv.bias.detach()
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{dst}.{name}.weight"] = w[i * a.channels:(i + 1) * a.channels].clone()
            out[f"{dst}.{name}.bias"] = b[i * a.channels:(i + 1) * a.channels].clone()
        out[f"{dst}.to_out.0.weight"] = a.proj_out.weight.detach()[..., 0].clone()
        out[f"{dst}.to_out.0.bias"] = a.proj_out.bias.detach().clone()

    put("time_embedding.linear_1", unet.time_embed[0])
    put("time_embedding.linear_2", unet.time_embed[2])
    put("conv_in", unet.input_conv)
    levels = len(cfg.channel_mult)
    blocks = iter(unet.down)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            block = next(blocks)
            res(f"down_blocks.{i}.resnets.{j}", block.res)
            if block.attn is not None:
                attn(f"down_blocks.{i}.attentions.{j}", block.attn)
        if i != levels - 1:
            put(f"down_blocks.{i}.downsamplers.0.conv", next(blocks).conv)
    res1, mid_attn, res2 = unet.middle
    res("mid_block.resnets.0", res1)
    attn("mid_block.attentions.0", mid_attn)
    res("mid_block.resnets.1", res2)
    blocks = iter(unet.up)
    for i in range(levels):
        for j in range(cfg.num_res_blocks + 1):
            block = next(blocks)
            res(f"up_blocks.{i}.resnets.{j}", block.res)
            if block.attn is not None:
                attn(f"up_blocks.{i}.attentions.{j}", block.attn)
            if block.up is not None:
                put(f"up_blocks.{i}.upsamplers.0.conv", block.up.conv)
    put("conv_norm_out", unet.out_norm)
    put("conv_out", unet.out_conv)
    return out


def to_unet2d(unet: UNet):
    """A diffusers ``UNet2DModel`` (fp32, eval mode) computing the same noise prediction as ``unet``."""
    _import_diffusers()
    from diffusers import UNet2DModel

    config = unet2d_config(unet.config)
    config["norm_eps"] = _norm_eps(unet)
    model = UNet2DModel(**config)
    state = unet2d_state_dict(unet)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:  # a mapping error: never write a half-loaded model
        raise RuntimeError(f"to-diffusers: the weight map does not cover UNet2DModel (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise RuntimeError(f"to-diffusers: {k} has shape {tuple(v.shape)}, UNet2DModel expects "
                               f"{tuple(expected[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def scheduler_config(betas: torch.Tensor) -> dict:
    """``DDPMScheduler`` arguments of our diffusion with these (float64) betas and our samplers'
    conventions: eps prediction, x0 clipped to [-1, 1], fixed-small variance."""
    return {
        "num_train_timesteps": int(betas.numel()),
        "trained_betas": [float(b) for b in betas.tolist()],
        # ignored by diffusers when trained_betas is given; set to our end points for the reader
        "beta_schedule": "linear",
        "beta_start": float(betas[0]),
        "beta_end": float(betas[-1]),
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        # x0 clipped to [-1, 1] by every scheduler that can: DDPM/DDIM read clip_sample, the multistep
        # solvers (DPM-Solver++, UniPC, DEIS) only thresholding, which with sample_max_value 1 is that
        # same clipping (s = clamp(quantile, 1, 1) = 1)
        "thresholding": True,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": TIMESTEP_SPACING,
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def _schedule_name(betas: torch.Tensor) -> str:
    for name in SCHEDULES:
        try:
            if torch.equal(make_betas(name, betas.numel()), betas.cpu()):
                return name
        except ValueError:
            continue
    return "custom"


def _max_rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    if not bool(torch.isfinite(theirs).all()):
        return math.inf
    return float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-30))


@torch.no_grad()
def compare(unet: UNet, model, num_timesteps: int, *, batch: int = CHECK_BATCH, seed: int = 0) -> tuple[float, list[int]]:
    """``(max|ours - diffusers| / max|ours|, timesteps)`` of the fp32 noise predictions of our UNet and
    a UNet2DModel on the same random x_t at timesteps spread over [0, T)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.linspace(0, num_timesteps - 1, batch).round().long()
    ours = unet.float()(x, t)
    theirs = model.float()(x, t).sample
    return _max_rel(ours, theirs), t.tolist()


# ---------------------------------------------------------------------------- the export
def _describe(cfg: UNetConfig) -> str:
    attn = ", ".join(str(r) for r in cfg.attention_resolutions)
    heads = f"{cfg.num_head_channels} channels per head" if cfg.num_head_channels else f"{cfg.num_heads} heads"
    return (f"{cfg.image_size}x{cfg.image_size}x{cfg.in_channels}, channels {cfg.model_channels} x "
            f"{tuple(cfg.channel_mult)}, {cfg.num_res_blocks} res block(s) per level, attention at "
            f"{attn + ' + ' if attn else ''}middle ({heads}), "
            f"{'scale-shift' if cfg.use_scale_shift_norm else 'additive'} timestep conditioning")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def export(src: str | Path, out: str | Path, *, ema: bool = True, overwrite: bool = False,
           log=print) -> dict:
    """Write the model at ``src`` to ``out`` as a diffusers DDPMPipeline folder (module docstring) and
    return what ``out/jdm_fast_export.json`` holds. The folder appears only once its check passed."""
    diffusers = _import_diffusers()
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    src, out = Path(src), Path(out)
    _prepare_out(out, overwrite)
    loaded: LoadedModel = load_joint_model(src, ema=ema, device="cpu")
    joint = loaded.model
    check_expressible(joint.config.unet, generates=joint.config.generates)
    unet = joint.unet.float()
    cfg = unet.config
    betas = joint.diffusion.betas.detach().cpu().double()
    T = int(betas.numel())
    n_ours = sum(p.numel() for p in unet.parameters())
    log(f"read {src}: {loaded.weights.upper() if loaded.weights == 'ema' else loaded.weights} weights at step "
        f"{loaded.step}, trained on {loaded.dataset}; UNet {n_ours / 1e6:.2f}M parameters ({_describe(cfg)}); "
        f"T = {T}, {_schedule_name(betas)} betas")

    if joint.head is None:
        head_note = "none: the model has no classifier head (objective 'diffusion')"
    else:
        head_note = ("stays jdm_fast's: UNet2DModel has no place for the head or the pooled encoder features it "
                     "reads; classify and steer sampling with jdm_fast.load_model(source)")
    model = to_unet2d(unet)
    scheduler = DDPMScheduler(**scheduler_config(betas))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp)
        # The check reads back what was written: what a user will load.
        written = UNet2DModel.from_pretrained(tmp / "unet", low_cpu_mem_usage=False).eval()
        err, ts = compare(unet, written, T)
        sched = DDPMScheduler.from_pretrained(tmp / "scheduler")
        abar = torch.cumprod(1.0 - betas, 0)
        abar_err = float(((sched.alphas_cumprod.double() - abar).abs() / abar).max())
        if not err <= CHECK_TOLERANCE:
            raise RuntimeError(f"to-diffusers: the exported UNet2DModel's noise prediction differs from ours by "
                               f"{err:.3g} (relative; allowed {CHECK_TOLERANCE:g}): not written")
        info = {
            "format": "jdm_fast -> diffusers DDPMPipeline (UNet2DModel + DDPMScheduler)",
            "source": str(src.resolve()),
            "source_kind": file_kind(src),
            "weights": loaded.weights,
            "step": loaded.step,
            "dataset": loaded.dataset,
            "unet_config": dataclasses.asdict(cfg),
            "schedule": _schedule_name(betas),
            "num_timesteps": T,
            "data_range": [-1.0, 1.0],
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
            "check": {
                "noise_prediction_max_rel_error": err,
                "tolerance": CHECK_TOLERANCE,
                "dtype": "float32",
                "batch": CHECK_BATCH,
                "timesteps": ts,
                "alphas_cumprod_max_rel_error": abar_err,
                "alphas_cumprod_note": "diffusers builds alphas_cumprod in float32 from the float64 betas",
            },
            "scheduler": {"timestep_spacing": TIMESTEP_SPACING, "clip_sample": True, "variance_type": "fixed_small"},
            "not_exported": {"classifier_head": head_note},
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():  # checked empty (or --overwrite) above
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_theirs = sum(p.numel() for p in model.parameters())
    log(f"wrote {out}/: unet/ (UNet2DModel, {n_theirs / 1e6:.2f}M parameters), scheduler/ (DDPMScheduler: "
        f"our betas, epsilon, x0 clipped to [-1, 1], {TIMESTEP_SPACING} spacing), model_index.json "
        f"(DDPMPipeline), {EXPORT_INFO}")
    log(f"check: noise prediction max relative difference {err:.2g} (float32, {CHECK_BATCH} inputs at t = "
        f"{', '.join(map(str, ts))}); alphas_cumprod {abar_err:.2g} (diffusers keeps it in float32)")
    if joint.head is not None:
        log("not exported: the classifier head (it stays jdm_fast's: jdm_fast.load_model(CKPT))")
    return info


# ---------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="checkpoint.pt of a run, or its model_ema.safetensors / model.safetensors")
    parser.add_argument("--out", required=True, metavar="DIR", help="the diffusers pipeline folder to write")
    parser.add_argument("--weights", choices=("ema", "raw"), default=None,
                        help="which weights of a checkpoint.pt (default ema); a safetensors export holds one set")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    src = Path(args.checkpoint)
    try:
        if args.weights is not None and src.is_file() and file_kind(src) == "safetensors":
            from safetensors import safe_open

            with safe_open(str(src), "pt") as f:
                held = (f.metadata() or {}).get("weights") or ("ema" if "ema" in src.stem else "raw")
            if held != args.weights:
                raise ValueError(f"--weights {args.weights}: {src} is a safetensors export holding the {held} "
                                 f"weights only")
        export(src, args.out, ema=args.weights != "raw", overwrite=args.overwrite)
    except (ImportError, NotExpressible, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        raise SystemExit(f"to-diffusers: {e}") from e
    return 0
