"""Load a trained joint model for sampling and evaluation: from a training checkpoint
(``checkpoint.pt``: raw or EMA weights) or from a safetensors export of the trainer
(``model.safetensors`` / ``model_ema.safetensors``: one set of weights, the run's config in the
metadata). Both are data only: nothing in a file runs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from jdm_fast.checkpoint import check_weights, load_checkpoint
from jdm_fast.data.augment import AugmentConfig, default_augment
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models.joint import JointConfig, JointDiffusion


@dataclass
class LoadedModel:
    model: JointDiffusion  # eval mode, parameters frozen
    weights: str  # "ema" or "raw"
    dataset: str
    data_dir: str | None
    step: int
    path: Path
    augment: AugmentConfig | None = None  # the head's training augmentation (None: trained without)

    @property
    def objective(self) -> str:
        """What the model was trained on: joint, diffusion (no head) or classifier (no decoder)."""
        return self.model.config.objective

    def require(self, ability: str, what: str) -> None:
        """Raise a ValueError naming the file and its objective unless the model can ``ability``
        ("generate": has a decoder; "classify": has a head) what the caller asks (``what``)."""
        ok = self.model.config.generates if ability == "generate" else self.model.config.classifies
        if not ok:
            lacks = "no decoder: it makes no samples" if ability == "generate" else "no classifier head"
            raise ValueError(f"{what} needs a model that can {ability}, but {self.path} was trained with "
                             f"--objective {self.objective} ({lacks})")

    @property
    def num_classes(self) -> int:
        return self.model.config.head.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        u = self.model.config.unet
        return (u.in_channels, u.image_size, u.image_size)


def strip_prefixes(state: dict) -> tuple[dict, int]:
    """Drop wrapper prefixes (torch.compile ``_orig_mod.``, DDP ``module.``) from state-dict keys:
    ``(stripped state, number of keys changed)``; two keys that become one are an error."""
    out, changed = {}, 0
    for k, v in state.items():
        key = k
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        changed += key != k
        if key in out:
            raise RuntimeError(f"two keys of the state dict become {key!r} once their prefixes are stripped")
        out[key] = v
    return out, changed


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip archive (what checkpoint.pt is)
_ACCEPTED = ("a jdm_fast training checkpoint (checkpoint.pt, a torch.save zip archive) or a safetensors "
             "export of the trainer (model.safetensors / model_ema.safetensors, config in the metadata)")


def file_kind(path: Path) -> str:
    """``"checkpoint"`` (a zip archive), ``"safetensors"`` (an 8-byte little-endian header length
    then a JSON header) or ``"unknown"``, from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "checkpoint"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:  # (a torn one fails to read)
        return "safetensors"
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict, dict, str, int]:
    """(config, state dict, "ema" | "raw", step) of a trainer export."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RuntimeError(f"safetensors file {path} is truncated or corrupt: {e}") from e
    if "config" not in meta:
        raise RuntimeError(f"{path} is a safetensors file without jdm_fast's config metadata; accepted: {_ACCEPTED}")
    try:
        cfg = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{path}: the config in its safetensors metadata is not valid JSON ({e})") from e
    # Exports name their weights and step; older ones are told apart by the file name, and were
    # written at the end of the run (step = the configured steps).
    weights = meta.get("weights") or ("ema" if "ema" in path.stem else "raw")
    return cfg, state, weights, int(meta.get("step", cfg.get("steps", 0)))


def load_joint_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """The weights at ``path`` as an eval-mode JointDiffusion with frozen parameters.

    ``path`` is a training checkpoint (``ema`` picks its EMA or raw weights) or a safetensors export
    (it holds one set of weights, which it names: ``ema`` does not apply, and
    ``LoadedModel.weights`` says which it is). Raises FileNotFoundError for a missing file and
    RuntimeError naming the file and what is accepted for anything else, and
    ``jdm_fast.checkpoint.CheckpointError`` (a RuntimeError) naming the file and the first bad
    tensor for weights that do not fit their config, are not floating point or are not finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = file_kind(path)
    if kind == "safetensors":
        cfg, weights_state, weights, step = _read_safetensors(path)
    elif kind == "checkpoint":
        state = load_checkpoint(path)
        cfg = state.get("config")
        weights = "ema" if ema else "raw"
        which = "ema" if ema else "model"
        if which not in state:
            raise RuntimeError(f"checkpoint {path} has no {which!r} weights")
        weights_state, step = state[which], int(state["step"])
    else:
        raise RuntimeError(f"{path} is not {_ACCEPTED}")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise RuntimeError(f"{path} has no model configuration")
    diffusion = GaussianDiffusion(make_betas(cfg.get("schedule", "jdm_linear"), cfg.get("num_timesteps", 1000)))
    model = JointDiffusion(JointConfig(**cfg["model"]), diffusion.to(device))
    weights_state = strip_prefixes(weights_state)[0]
    check_weights(weights_state, model.state_dict(), f"{path} ({weights} weights)")
    model.load_state_dict(weights_state)
    model.to(device).eval().requires_grad_(False)
    dataset = cfg.get("dataset", "digits")
    augment = default_augment(dataset) if cfg.get("augment", True) else None
    return LoadedModel(model, weights, dataset, cfg.get("data_dir"), step, path,
                       augment if augment is not None and augment.enabled else None)
