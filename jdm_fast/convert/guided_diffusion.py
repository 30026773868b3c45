"""``python -m jdm_fast.convert guided-diffusion CKPT [flags] --out DIR``: a UNet state dict of the
Joint Diffusion Models authors' code (github.com/KamilDeja/joint_diffusion, an OpenAI
guided-diffusion fork) or of OpenAI's guided-diffusion, as a jdm_fast model.

CKPT is a state dict as their training saves it (``torch.save``; ``modelNNNNNN.pt`` /
``ema_0.9999_NNNNNN.pt``) or a ``.safetensors`` file of the same keys: ``time_embed.*``,
``input_blocks.*``, ``middle_block.*``, ``output_blocks.*``, ``out.*`` and, for the authors' joint
model, their classifier head ``clasifier.*``. ``module.`` (DDP) and ``_orig_mod.`` prefixes are
stripped; the authors' kornia augmentation (``augmentation.*``), if it left anything, is ignored.
It is read as data (``torch.load(weights_only=True)``); fp16 weights are cast to fp32.

The flags describe the model the way their scripts' flags do, with their names (``--num-channels``
or ``--num_channels``) and their defaults (``model_and_diffusion_defaults`` of the authors'
script_util; OpenAI's differ only in ``--image-size``, 64 there); booleans take ``True``/``False``
as theirs do, or ``--no-...``. A state dict does not record the attention heads or their order:
``--num-heads`` / ``--num-head-channels`` / ``--use-new-attention-order`` must be what the model was
trained with. Everything else is checked against the tensors, and a mismatch names the flag.

DIR gets what the trainer writes at the end of a run: ``checkpoint.pt`` (a step-0 training state
whose raw and EMA weights are both the converted weights, so ``jdm_fast.load_model(DIR /
"checkpoint.pt")`` reads it either way), ``model_ema.safetensors`` (or ``model.safetensors`` when
CKPT holds raw weights: ``--weights``; the default reads it off the file name, ``ema_*`` = EMA)
with the config in its metadata, and ``config.json``. Both files record where they came from
(``converted_from``).

What the conversion does, exactly:

* Attention: their default (``use_new_attention_order=False``, QKVAttentionLegacy) splits the qkv
  rows into heads first, then q/k/v (row ``h*3*d + s*d + i``); jdm_fast's layout is q/k/v first
  (row ``s*C + h*d + i``), which is their new order (QKVAttention). Legacy-order qkv weights and
  biases are permuted into ours; new-order ones are copied.
* ``--learn-sigma``: ``out.2`` has 2C output channels, eps first. The C eps channels are kept (the
  noise prediction is exact) and the C variance channels are dropped: the converted model predicts
  eps only and samples with jdm_fast's fixed variances.
* The authors' head reads ``cat([middle, skips..., t])``: the pooled middle-block output first, and
  the raw timestep as one more feature. Ours reads ``cat([skips..., middle])`` and no timestep. The
  columns of ``bn_1`` / ``fc_1`` are permuted into our order, and the timestep feature is FOLDED:
  at t = 0 (where the authors' ``classify`` runs by default and where they train it unless
  ``--train_noised_classifier``) its eval-mode BatchNorm output is a constant,
  ``c = (0 - mean) / sqrt(var + eps) * weight + bias``, so ``fc_1.bias += fc_1.weight[:, t] * c``
  reproduces their logits exactly at t = 0. At t > 0 their head also reads t (PAPER.md: a flaw we
  fix); ours does not. Head dropout is theirs, 0.7.
* ``--noise-schedule linear`` means different betas in the two codes: the authors' is
  1e-3..0.02 (x 1000/T), jdm_fast's ``jdm_linear``; OpenAI's is 1e-4..0.02, jdm_fast's
  ``linear``. ``cosine`` is the same everywhere. Which code wrote CKPT is ``--source``; by default
  the authors' when it has ``clasifier.*`` keys, OpenAI's otherwise (say ``--source jdm`` for a
  headless model of the authors' code).
* A model without ``clasifier.*`` keys converts to objective ``diffusion`` (no head).

Refused, with the flag named: ``--resblock-updown True`` (up/down-sampling ResBlocks: ours resample
with a strided conv / nearest + conv), OpenAI's ``--class-cond`` models (``label_emb.*`` keys: our UNet
is unconditional; the authors' ``--class_cond True`` builds no ``label_emb`` and converts),
``--channel-mult`` not starting with 1 (their input conv has ``channel_mult[0] * num_channels``
channels, ours ``num_channels``), ``--num-heads-upsample`` other than ``--num-heads``,
``--predict-xstart``, ``--rescale-timesteps`` with ``--diffusion-steps`` other than 1000, the
authors' linear schedule with fewer than 10 steps (their formula changes there), and an authors'
head whose middle-block pooling is not global.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# The authors' script_util.create_model: channel_mult by image size when --channel-mult is "" (OpenAI's
# has the first four only and raises for the others).
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                        64: (1, 2, 3, 4), 32: (1, 2, 2, 2), 28: (1, 2, 2)}
# The authors' Classifier: AvgPool2d(k) of the middle block by image size (anything else: no head).
HEAD_MIDDLE_POOL = {28: 7, 32: 4, 64: 8}
HEAD_DROPOUT = 0.7  # the authors' Classifier's, hard-coded
SOURCES = {"jdm": "the authors' JDM code (KamilDeja/joint_diffusion)",
           "guided-diffusion": "OpenAI guided-diffusion"}
# (source, --noise-schedule) -> jdm_fast schedule
SCHEDULE_MAP = {("jdm", "linear"): "jdm_linear", ("guided-diffusion", "linear"): "linear",
                ("jdm", "cosine"): "cosine", ("guided-diffusion", "cosine"): "cosine"}
# our ResBlock's submodules <- theirs
RES_MAP = {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb": "emb_layers.1",
           "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection"}
HEAD = "clasifier."
IGNORED_PREFIXES = ("augmentation.",)


class ConversionError(ValueError):
    """CKPT and the flags describe something we cannot convert exactly (the message says what, and
    which flag)."""


# ---------------------------------------------------------------------------- flags
def _str2bool(v: str) -> bool:
    """Their script_util.str2bool."""
    s = str(v).lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (True/False), got {v!r}")


def _names(flag: str) -> list[str]:
    """``--num-channels`` and their spelling ``--num_channels``."""
    return list(dict.fromkeys([f"--{flag}", f"--{flag.replace('-', '_')}"]))


def _add(p: argparse.ArgumentParser, flag: str, **kw) -> None:
    p.add_argument(*_names(flag), dest=flag.replace("-", "_"), **kw)


def _add_bool(p: argparse.ArgumentParser, flag: str, default: bool | None, help: str) -> None:
    dest = flag.replace("-", "_")
    p.add_argument(*_names(flag), dest=dest, nargs="?", const=True, type=_str2bool, default=default,
                   metavar="BOOL", help=f"{help} (default {'from CKPT' if default is None else default})")
    p.add_argument(f"--no-{flag}", dest=dest, action="store_false", help=f"= --{flag} False")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="their state dict: a torch.save .pt file or a .safetensors file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write checkpoint.pt, "
                        "model_ema.safetensors (or model.safetensors) and config.json to")
    parser.add_argument("--overwrite", action="store_true", help="replace those files if DIR has them")
    m = parser.add_argument_group("the model, as their flags describe it (their names and defaults)")
    _add(m, "image-size", type=int, default=32, help="default 32 (the authors'; OpenAI's default is 64)")
    _add(m, "in-channels", type=int, default=3, help="default 3")
    _add(m, "num-channels", type=int, default=128, help="default 128")
    _add(m, "num-res-blocks", type=int, default=2, help="default 2 (the authors' runs: 3)")
    _add(m, "channel-mult", default="", help='e.g. "1,2,2,2"; default "": by image size as their create_model')
    _add(m, "attention-resolutions", default="16,8",
         help='feature-map sizes in pixels, as theirs (converted to downsampling factors image_size // res); '
              'default "16,8"')
    _add(m, "num-heads", type=int, default=4, help="default 4 (not recorded in a state dict: give the trained value)")
    _add(m, "num-head-channels", type=int, default=-1, help="default -1 (use --num-heads)")
    _add(m, "num-heads-upsample", type=int, default=-1, help="default -1 (= --num-heads; other values are refused)")
    _add_bool(m, "use-scale-shift-norm", True, "FiLM timestep conditioning")
    _add_bool(m, "resblock-updown", False, "ResBlocks for up/downsampling (True is refused)")
    _add_bool(m, "use-new-attention-order", False, "QKVAttention instead of QKVAttentionLegacy")
    _add_bool(m, "learn-sigma", False, "2C outputs (eps, variance); the variance channels are dropped")
    _add_bool(m, "use-fp16", False, "trained in fp16 (accepted: weights are cast to fp32)")
    _add_bool(m, "class-cond", False, "accepted; what decides is CKPT: OpenAI's class-conditional UNet "
              "(label_emb.*) is refused, the authors' has no label_emb (their class_cond feeds the head)")
    _add_bool(m, "train-with-classifier", None, "the authors' head: whether CKPT has clasifier.* keys; "
              "False converts a joint model without its head")
    _add_bool(m, "multi-label-classifier", False, "the authors' multi-label head (CelebA): BCE, not CE")
    _add_bool(m, "predict-xstart", False, "x0-predicting model (refused: ours predict eps)")
    _add_bool(m, "rescale-timesteps", False, "the model saw t * 1000 / T (refused unless T = 1000)")
    _add(m, "dropout", type=float, default=0.0, help="UNet dropout (training only), default 0.0")
    _add(m, "num-classes", type=int, default=None, help="the head's classes (default: read off clasifier.fc_2)")
    d = parser.add_argument_group("the diffusion")
    _add(d, "diffusion-steps", type=int, default=1000, help="T, default 1000")
    _add(d, "noise-schedule", choices=("linear", "cosine"), default="linear",
         help="their name; linear means the authors' 1e-3..0.02 or OpenAI's 1e-4..0.02 by --source (default linear)")
    o = parser.add_argument_group("jdm_fast")
    o.add_argument("--source", choices=("auto", *SOURCES), default="auto",
                   help="which code wrote CKPT (decides what linear means); auto: jdm if CKPT has clasifier.* keys")
    o.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                   help="what CKPT holds; auto: ema if its file name starts with 'ema', else raw")
    o.add_argument("--dataset", default=None,
                   help="the dataset it was trained on, recorded for jdm_fast.sample/evaluate (e.g. cifar10); "
                        "default: unknown")


# ---------------------------------------------------------------------------- reading CKPT
def read_state_dict(path: Path) -> dict:
    """The tensors of CKPT (a torch.save dict of tensors, or safetensors), prefixes not yet stripped."""
    import torch

    from jdm_fast.checkpoint import UnsafeFileError, safe_load
    from jdm_fast.generation.loading import file_kind

    if not path.is_file():
        raise FileNotFoundError(f"no state dict at {path}")
    kind = file_kind(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path} is a truncated or corrupt safetensors file: {e}") from e
    if kind != "checkpoint":  # torch.save's zip archive
        raise ConversionError(f"{path} is neither a torch.save state dict nor a safetensors file")
    try:
        state = safe_load(path, "state dict")
    except UnsafeFileError:
        raise
    except Exception as e:  # torch raises several types for what is not a torch.save archive
        raise ConversionError(f"{path} is neither a torch.save state dict nor a safetensors file ({e})") from e
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        if isinstance(state, dict):
            kind = "a dict of " + ", ".join(sorted({type(v).__name__ for v in state.values()})) if state else "an empty dict"
        else:
            kind = type(state).__name__
        raise ConversionError(f"{path} holds {kind}, not a state dict (a flat dict of tensors as their "
                              "training saves it)")
    return state


# ---------------------------------------------------------------------------- flags -> config
def channel_mult(args) -> tuple[int, ...]:
    if args.channel_mult == "":
        if args.image_size not in DEFAULT_CHANNEL_MULT:
            raise ConversionError(f"--channel-mult is not given and their create_model has no default for "
                                  f"--image-size {args.image_size}: pass --channel-mult")
        mult = DEFAULT_CHANNEL_MULT[args.image_size]
    else:
        try:
            mult = tuple(int(m) for m in args.channel_mult.split(","))
        except ValueError:
            raise ConversionError(f"--channel-mult must be comma-separated integers, got {args.channel_mult!r}") from None
    if mult[0] != 1:
        raise ConversionError(f"--channel-mult {','.join(map(str, mult))}: their input conv has channel_mult[0] * "
                              f"num_channels channels, jdm_fast's num_channels: only channel_mult[0] = 1 converts")
    return mult


def attention_sizes(args, levels: int) -> tuple[tuple[int, ...], list[int]]:
    """(our attention_resolutions in pixels, their entries that match no level and so have no
    effect in their UNet either). Theirs: ``ds = image_size // int(res)``, attention where the
    downsampling factor ``ds`` of a level (1, 2, 4, ...) is in that list."""
    try:
        ds = [args.image_size // int(r) for r in str(args.attention_resolutions).split(",")]
    except (ValueError, ZeroDivisionError):
        raise ConversionError(f"--attention-resolutions must be comma-separated positive pixel sizes, "
                              f"got {args.attention_resolutions!r}") from None
    level_ds = [2**i for i in range(levels)]
    sizes = tuple(dict.fromkeys(args.image_size // d for d in ds if d in level_ds))
    unused = [int(r) for r, d in zip(str(args.attention_resolutions).split(","), ds) if d not in level_ds]
    return sizes, unused


def schedule(source: str, args) -> str:
    if source == "jdm" and args.noise_schedule == "linear" and args.diffusion_steps < 10:
        raise ConversionError(f"--diffusion-steps {args.diffusion_steps}: below 10 steps the authors' linear schedule "
                              "is 0.01 x 100/T .. 0.02 x 100/T, which jdm_fast has no name for")
    name = SCHEDULE_MAP[(source, args.noise_schedule)]
    from jdm_fast.diffusion import make_betas

    try:
        make_betas(name, args.diffusion_steps)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"--diffusion-steps {args.diffusion_steps} / --noise-schedule {args.noise_schedule}: {e}") from e
    return name


def refuse_unsupported(args, state: dict) -> None:
    if args.dataset is not None:  # recorded for sample/evaluate, which load it: a name they know, or a folder
        from jdm_fast.data import DATASET_INFO
        if args.dataset.lower() not in DATASET_INFO and not Path(args.dataset).is_dir():
            raise ConversionError(f"--dataset {args.dataset}: not one of {', '.join(DATASET_INFO)} and not an "
                                  "existing image folder (leave it out when the dataset is not at hand)")
    if args.resblock_updown:
        raise ConversionError("--resblock-updown True: their up/downsampling ResBlocks have no counterpart in "
                              "jdm_fast's UNet (strided-conv downsampling, nearest + conv upsampling); cannot convert")
    # OpenAI's class_cond builds label_emb; the authors' UNet never does (their --class_cond True only
    # hands the labels to the head), so the key decides, not the flag.
    if any(k.startswith("label_emb.") for k in state):
        raise ConversionError("--class-cond: CKPT is a class-conditional UNet (label_emb.weight adds a class "
                              "embedding to the timestep embedding); jdm_fast's UNet is unconditional, cannot convert")
    if args.num_heads_upsample not in (-1, args.num_heads) and args.num_head_channels == -1:
        raise ConversionError(f"--num-heads-upsample {args.num_heads_upsample} != --num-heads {args.num_heads}: "
                              "jdm_fast uses one head count for every attention layer")
    if args.predict_xstart:
        raise ConversionError("--predict-xstart True: the model predicts x0, jdm_fast's predict eps")
    if args.rescale_timesteps and args.diffusion_steps != 1000:
        raise ConversionError(f"--rescale-timesteps True with --diffusion-steps {args.diffusion_steps}: the model saw "
                              "t * 1000 / T, jdm_fast feeds t itself (the same only for T = 1000)")


def _has_head(args, state: dict) -> bool:
    present = any(k.startswith(HEAD) for k in state)
    if args.train_with_classifier and not present:
        raise ConversionError("--train-with-classifier True, but CKPT has no clasifier.* keys (no head)")
    return present and args.train_with_classifier is not False


def build_config(args, state: dict):
    """(TrainConfig, notes): the jdm_fast configuration of the model the flags describe."""
    from jdm_fast.models.config import HeadConfig, UNetConfig
    from jdm_fast.models.joint import JointConfig
    from jdm_fast.training.config import TrainConfig

    refuse_unsupported(args, state)
    notes = {}
    mult = channel_mult(args)
    sizes, unused = attention_sizes(args, len(mult))
    if unused:
        notes["attention_unused"] = unused
    heads = ({"num_heads": None, "num_head_channels": args.num_head_channels} if args.num_head_channels != -1
             else {"num_heads": args.num_heads, "num_head_channels": None})
    try:
        unet = UNetConfig(image_size=args.image_size, in_channels=args.in_channels, model_channels=args.num_channels,
                          channel_mult=mult, num_res_blocks=args.num_res_blocks, attention_resolutions=sizes,
                          dropout=args.dropout, use_scale_shift_norm=args.use_scale_shift_norm, num_groups=32,
                          **heads)
    except ValueError as e:
        raise ConversionError(f"the flags describe no jdm_fast UNet: {e}") from e
    head_present = _has_head(args, state)
    source = args.source if args.source != "auto" else ("jdm" if any(k.startswith(HEAD) for k in state)
                                                        else "guided-diffusion")
    if head_present and source != "jdm":
        raise ConversionError("--source guided-diffusion, but CKPT has the authors' classifier head (clasifier.*)")
    num_classes = args.num_classes
    if head_present:
        fc2 = state.get(HEAD + "fc_2.weight")
        if fc2 is None or fc2.dim() != 2:
            raise ConversionError("CKPT has clasifier.* keys but no 2-d clasifier.fc_2.weight")
        if num_classes is not None and num_classes != fc2.shape[0]:
            raise ConversionError(f"--num-classes {num_classes}, but clasifier.fc_2.weight has {fc2.shape[0]} rows "
                                  f"(classes)")
        num_classes = fc2.shape[0]
    try:
        head = HeadConfig(num_classes=num_classes or 10, dropout=HEAD_DROPOUT, multi_label=args.multi_label_classifier)
    except ValueError as e:
        raise ConversionError(f"--num-classes: {e}") from e
    objective = {"objective": "joint" if head_present else "diffusion"}
    model = JointConfig(unet=unet, head=head, **objective)
    sched = schedule(source, args)
    cfg = TrainConfig(preset="converted", dataset=(args.dataset or "unknown").lower(), model=model,
                      num_timesteps=args.diffusion_steps, schedule=sched, out=str(args.out), steps=1,
                      augment=False, sample_steps=min(100, args.diffusion_steps))
    notes.update(source=source, head=head_present)
    return cfg, notes


# ---------------------------------------------------------------------------- the key map
def their_key(ours: str, model) -> str | None:
    """Their name of our UNet parameter ``ours`` (``unet.*`` of a JointDiffusion); None for a head key."""
    if not ours.startswith("unet."):
        return None
    p = ours[len("unet."):].split(".")
    name = p[-1]
    if p[0] == "time_embed":
        return ".".join(p)
    if p[0] == "input_conv":
        return f"input_blocks.0.0.{name}"
    if p[0] in ("out_norm", "out_conv"):
        return f"out.{0 if p[0] == 'out_norm' else 2}.{name}"
    if p[0] == "middle":
        j = int(p[1])
        return f"middle_block.1.{p[2]}.{name}" if j == 1 else f"middle_block.{j}.{RES_MAP[p[2]]}.{name}"
    i = int(p[1])
    if p[0] == "down":
        block = f"input_blocks.{i + 1}"
        if p[2] == "conv":  # Downsample
            return f"{block}.0.op.{name}"
    elif p[0] == "up":
        block = f"output_blocks.{i}"
        if p[2] == "up":  # Upsample: after the ResBlock and the attention, if any
            return f"{block}.{2 if model.unet.up[i].attn is not None else 1}.conv.{name}"
    else:
        raise ConversionError(f"internal: no rule for {ours}")
    if p[2] == "res":
        return f"{block}.0.{RES_MAP[p[3]]}.{name}"
    return f"{block}.1.{p[3]}.{name}"  # attn


def _shape_hint(key: str, got: tuple, want: tuple) -> str:
    if key.startswith("time_embed."):
        return "--num-channels"
    if key.startswith("input_blocks.0.0.") and len(got) == 4 and got[1] != want[1]:
        return "--in-channels"
    if ".emb_layers." in key and got[0] in (2 * want[0], want[0] // 2):
        return "--use-scale-shift-norm"
    if key.startswith("out.2.") and got[0] != want[0]:
        return "--learn-sigma / --in-channels"
    return "--num-channels / --channel-mult / --num-res-blocks"


def _key_hints(missing: list[str], unexpected: list[str]) -> list[str]:
    both = missing + unexpected
    hints = []
    if any(re.search(r"\.(qkv|proj_out)\.", k) or re.search(r"blocks\.\d+\.1\.norm\.", k) for k in both):
        hints.append("--attention-resolutions (pixel sizes; with --image-size they give the downsampling "
                     "factors image_size // res where attention sits)")
    if any(re.match(r"input_blocks\.\d+\.0\.(in_layers|emb_layers|out_layers)\.", k) for k in unexpected) and any(
            k.endswith(".op.weight") for k in missing):
        hints.append("--resblock-updown (CKPT downsamples with ResBlocks: refused)")
    hints.append("--num-res-blocks / --channel-mult / --image-size")
    return hints


def _head_tensors(state: dict, model, features: int, middle: int) -> dict:
    """Our head's tensors from theirs: columns into our feature order (skips, then middle), the
    timestep feature folded into fc_1's bias at t = 0."""
    import torch

    want = {"bn_1": (features + 1,), "fc_1": (features // 2, features + 1), "bn_2": (features // 2,),
            "fc_2": (model.head.net[6].out_features, features // 2)}
    for layer, shape in want.items():
        w = state.get(f"{HEAD}{layer}.weight")
        if w is None:
            raise ConversionError(f"CKPT's head lacks {HEAD}{layer}.weight")
        if tuple(w.shape) != shape:
            raise ConversionError(
                f"{HEAD}{layer}.weight has shape {tuple(w.shape)}, this layout's head needs {shape}: the encoder "
                f"gives {features} pooled features (+1 timestep), their head was built for "
                f"{state[HEAD + 'bn_1.weight'].shape[0] - 1 if HEAD + 'bn_1.weight' in state else '?'}: check "
                f"--num-channels / --num-res-blocks / --channel-mult")
    skips = features - middle
    # theirs: [middle (0..middle-1), skips (middle..features-1), t (features)]; ours: [skips, middle]
    perm = torch.cat([torch.arange(middle, features), torch.arange(middle)])
    f32 = {k[len(HEAD):]: v for k, v in state.items() if k.startswith(HEAD)}
    bn1 = {k: f32[f"bn_1.{k}"].double() for k in ("weight", "bias", "running_mean", "running_var")}
    eps = model.head.net[1].eps
    t_feature = ((0.0 - bn1["running_mean"][features]) / torch.sqrt(bn1["running_var"][features] + eps)
                 * bn1["weight"][features] + bn1["bias"][features])
    w1 = f32["fc_1.weight"].double()
    out = {f"head.net.1.{k}": v[perm].float() for k, v in bn1.items()}
    out["head.net.1.num_batches_tracked"] = f32.get("bn_1.num_batches_tracked", torch.tensor(0))
    out["head.net.2.weight"] = w1[:, perm].float()
    out["head.net.2.bias"] = (f32["fc_1.bias"].double() + w1[:, features] * t_feature).float()
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if f"bn_2.{k}" in f32:
            out[f"head.net.5.{k}"] = f32[f"bn_2.{k}"]
    out["head.net.6.weight"], out["head.net.6.bias"] = f32["fc_2.weight"], f32["fc_2.bias"]
    assert skips > 0
    return out


def convert_state(state: dict, model, args, notes: dict) -> dict:
    """Our state dict (``model.state_dict()`` keys) from theirs; raises ConversionError naming the
    keys and the flags when they do not match."""
    import torch

    cfg = model.config.unet
    ours = model.state_dict()
    mapping = {k: their_key(k, model) for k in ours if k.startswith("unet.")}
    expected = set(mapping.values())
    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    head_keys = [k for k in state if k.startswith(HEAD)]
    if head_keys and not notes["head"]:
        notes["head_dropped"] = len(head_keys)
    body = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES + (HEAD,))}
    missing = sorted(expected - set(body))
    unexpected = sorted(set(body) - expected)
    if missing or unexpected:
        def some(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        parts = ([f"missing {len(missing)} key(s): {some(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)} key(s): {some(unexpected)}"] if unexpected else [])
        raise ConversionError("CKPT does not have the layout the flags describe: " + "; ".join(parts)
                              + ". Check " + "; ".join(_key_hints(missing, unexpected)))
    c = cfg.in_channels
    out_rows = 2 * c if args.learn_sigma else c
    converted, bad = {}, []
    for k, src in mapping.items():
        t = body[src]
        want = tuple(ours[k].shape)
        if src.startswith("out.2.") and t.shape[:1] == (out_rows,):
            t = t[:c]  # eps channels first; learn_sigma's variance channels dropped
        elif src.startswith("out.2.") and tuple(t.shape[:1]) != (out_rows,):
            bad.append((src, tuple(t.shape), (out_rows, *want[1:]), "--learn-sigma / --in-channels"))
            continue
        if tuple(t.shape) != want:
            bad.append((src, tuple(t.shape), want, _shape_hint(src, tuple(t.shape), want)))
            continue
        if not t.is_floating_point() and not k.endswith("num_batches_tracked"):
            raise ConversionError(f"{src} has dtype {t.dtype}, not a floating-point weight")
        converted[k] = t
    if bad:
        lines = "; ".join(f"{s} has shape {g} in CKPT, the flags give {w}: check {h}" for s, g, w, h in bad[:4])
        raise ConversionError(f"CKPT does not match the flags: {lines}" + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
    if not args.use_new_attention_order:  # legacy: rows (head, q/k/v, d) -> ours (q/k/v, head, d)
        for k in converted:
            if re.search(r"\.attn\.qkv\.|\.middle\.1\.qkv\.", k):
                attn = model.get_submodule(k.rsplit(".", 2)[0])
                h, d = attn.num_heads, attn.channels // attn.num_heads
                t = converted[k]
                converted[k] = t.reshape(h, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    if notes["head"]:
        features = model.unet.feature_channels
        middle = cfg.model_channels * cfg.channel_mult[-1]
        middle_size = cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
        pool = HEAD_MIDDLE_POOL.get(cfg.image_size)
        if pool != middle_size:
            raise ConversionError(
                f"--image-size {cfg.image_size} / --channel-mult: the authors' head pools the middle block with "
                f"AvgPool2d({pool}) (image sizes {sorted(HEAD_MIDDLE_POOL)} only), here {middle_size}x{middle_size}: "
                "not a global average, which jdm_fast's head reads; cannot convert")
        converted.update(_head_tensors(state, model, features, middle))
    for k, v in list(converted.items()):
        converted[k] = v.float().contiguous() if v.is_floating_point() else v.to(torch.int64)
    notes["ignored"] = len(ignored)
    return converted


# ---------------------------------------------------------------------------- writing DIR
def _weights_kind(args, path: Path) -> str:
    if args.weights != "auto":
        return args.weights
    return "ema" if path.name.lower().startswith("ema") else "raw"


def convert(args) -> list[str]:
    """Convert CKPT into DIR; returns the lines it reports."""
    import dataclasses

    import torch

    from jdm_fast.checkpoint import CHECKPOINT_NAME, atomic_write, save_checkpoint
    from jdm_fast.generation.loading import load_joint_model, strip_prefixes
    from jdm_fast.training.loop import build_model, export_safetensors

    src, out = Path(args.checkpoint), Path(args.out)
    raw, stripped = strip_prefixes(read_state_dict(src))
    cfg, notes = build_config(args, raw)
    weights = _weights_kind(args, src)
    names = [CHECKPOINT_NAME, "model_ema.safetensors" if weights == "ema" else "model.safetensors", "config.json"]
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} exists and is not a folder")
    present = [n for n in names if (out / n).exists()]
    if present and not args.overwrite:
        raise FileExistsError(f"{out} already has {', '.join(present)}: pass --overwrite to replace them")
    model = build_model(cfg, torch.device("cpu"))
    state = convert_state(raw, model, args, notes)
    model.load_state_dict(state, strict=True)
    u = cfg.model.unet
    heads = (f"{u.num_heads} heads" if u.num_heads is not None else f"{u.num_head_channels} channels per head")
    order = ("new order (copied)" if args.use_new_attention_order else "legacy order (qkv rows permuted into ours)")
    lines = [f"read {src}: {len(raw)} tensors" + (f", 'module.'/'_orig_mod.' stripped from {stripped} keys" if stripped else "")
             + (f", {notes['ignored']} augmentation.* entries ignored" if notes["ignored"] else ""),
             f"source: {SOURCES[notes['source']]}" + (" (--source)" if args.source != "auto" else
                                                     " (auto: clasifier.* keys)" if notes["head"] else " (auto: no clasifier.* keys)"),
             f"UNet: {u.image_size}x{u.image_size}x{u.in_channels}, {u.model_channels} channels x {u.channel_mult}, "
             f"{u.num_res_blocks} res blocks, attention at {', '.join(f'{s}x{s}' for s in u.attention_resolutions) or 'no level'} "
             f"+ middle ({heads}, {order}), scale-shift norm {'on' if u.use_scale_shift_norm else 'off'}, dropout {u.dropout}"]
    if notes.get("attention_unused"):
        lines.append(f"note: --attention-resolutions {notes['attention_unused']} match no level of this UNet "
                     "(no attention there in their model either)")
    if args.learn_sigma:
        lines.append(f"learn_sigma: kept the {u.in_channels} eps channels of out.2, dropped its {u.in_channels} "
                     "variance channels (the converted model predicts eps; jdm_fast samples with fixed variances)")
    if notes["head"]:
        h = cfg.model.head
        lines.append(f"head: {h.num_classes} classes{' (multi-label)' if h.multi_label else ''}, "
                     f"{model.unet.feature_channels} pooled features (their middle-first order permuted to ours); "
                     "their timestep input folded into fc_1's bias at t = 0 (exact where they classify, t = 0)")
    elif notes.get("head_dropped"):
        lines.append(f"head: dropped ({notes['head_dropped']} clasifier.* tensors; --train-with-classifier False): "
                     "objective diffusion")
    else:
        lines.append("head: none (objective diffusion)")
    lines.append(f"schedule: --noise-schedule {args.noise_schedule} of {SOURCES[notes['source']]} = jdm_fast "
                 f"'{cfg.schedule}', T = {cfg.num_timesteps}")
    converted_from = {
        "file": str(src), "source": notes["source"], "weights": weights,
        "flags": {k: v for k, v in sorted(vars(args).items()) if k not in ("checkpoint", "out", "overwrite", "command")},
        "head_timestep": "folded into fc_1 bias at t = 0" if notes["head"] else None,
        "dropped": (["out.2 variance channels (learn_sigma)"] if args.learn_sigma else [])
        + ([f"clasifier.* ({notes['head_dropped']} tensors)"] if notes.get("head_dropped") else []),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT_NAME, {"config": dataclasses.asdict(cfg), "step": 0, "model": tensors,
                                            "ema": tensors, "converted_from": converted_from}, keep_previous=False)
    export_safetensors(model, out / names[1], cfg, weights, 0, converted_from=json.dumps(converted_from))
    atomic_write(out / "config.json", lambda f: f.write(cfg.to_json().encode()))
    # Read back the way users will: the files load into the same weights.
    for name in names[:2]:
        back = load_joint_model(out / name, device="cpu").model.state_dict()
        if back.keys() != tensors.keys() or any(not torch.equal(back[k], tensors[k]) for k in tensors):
            raise RuntimeError(f"{out / name} does not read back as the converted weights")
    n = sum(p.numel() for p in model.parameters())
    lines.append(f"wrote {out / names[0]}, {out / names[1]} ({weights} weights), {out / names[2]}: {n / 1e6:.2f}M "
                 "parameters; both read back with jdm_fast.load_model")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        for line in convert(args):
            print(line)
    except (ConversionError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        raise SystemExit(f"guided-diffusion: {e}") from e
    return 0

