"""Train a joint diffusion model: ``python -m jdm_fast.train [--preset digits] [--amp] ...``.

Validates the options, resolves them against the preset into a frozen ``TrainConfig``, prints it,
writes it to ``<out>/config.json`` and runs the loop. Under ``torchrun --nproc_per_node=N -m
jdm_fast.train ...`` it trains data-parallel (``--batch-size`` stays the global batch); only rank 0
prints, logs, samples and writes files.

Exit status: 0 done; 2 bad options or input (one line on stderr); 1 non-finite training or an
unusable checkpoint; 128 + signal number when SIGTERM (143), SIGINT (130) or SIGUSR1 (138) stopped
the run after a step whose checkpoint was written (continue it with --resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from jdm_fast.data import DATASET_INFO
from jdm_fast.data.loaders import BACKENDS
from jdm_fast.diffusion import SCHEDULES
from jdm_fast.models.joint import CLASSIFIER_INPUTS, OBJECTIVES, with_objective
from jdm_fast.training.config import COMPILE_MODES, DEFAULT_PRESET, PRESETS, TrainConfig, get_preset

# flag -> TrainConfig field, for options that override the preset when given
_OVERRIDES = ("data_dir", "out", "steps", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip",
              "ema_decay", "amp", "compile", "compile_mode", "channels_last", "augment", "labelled_fraction", "loader", "optimizer",
              "eval_every", "save_every", "log_every", "sampler", "sample_steps", "num_samples", "seed", "device",
              "resume", "num_timesteps", "schedule", "dataset", "max_nonfinite", "tensorboard")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jdm_fast.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {sorted(PRESETS)}")
    p.add_argument("--dataset", help="override the preset's dataset (a name or a class-per-folder path)")
    p.add_argument("--data-dir", help="folder holding the dataset's standard files (never downloaded)")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max gradient norm (preset default; 0 disables)")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast where the hardware has fast bf16, fp16+GradScaler on other GPUs, "
                        "fp32 on CPUs without native bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on for CUDA, off on CPU)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode: reduce-overhead replays CUDA graphs (static shapes), max-autotune "
                        "benchmarks kernel choices (long first compile)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model channels-last (default on: faster on CUDA and, measured, on CPUs)")
    p.add_argument("--dropout", type=float, help="UNet dropout")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="augment the classifier input (the loader's per-example keyed flips/crops/jitter; "
                        "--no-augment to turn off)")
    p.add_argument("--labelled-fraction", type=float, help="fraction of training labels kept (semi-supervised)")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="what to train (default joint): joint = eps-MSE + lambda * CE; diffusion = the UNet on the "
                        "eps-MSE alone (no head); classifier = encoder + head on the CE of clean images at t = 0 "
                        "alone (no decoder is built)")
    p.add_argument("--classifier-weight", type=float, help="lambda of the joint loss")
    p.add_argument("--classifier-input", choices=CLASSIFIER_INPUTS,
                   help="classifier on clean x0 (t=0), on noisy x_t, or both (CE of the two summed: a noise-aware head)")
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--num-timesteps", type=int)
    p.add_argument("--loader", choices=BACKENDS)
    p.add_argument("--optimizer", choices=["adamw", "apex"])
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--sampler", choices=["ancestral", "ddim"], help="sampler of the sample grids")
    p.add_argument("--sample-steps", type=int, help="sampler steps of the sample grids")
    p.add_argument("--num-samples", type=int, help="images per sample grid")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt (or checkpoint.prev.pt when that one is damaged)")
    p.add_argument("--max-nonfinite", type=int,
                   help="stop after this many consecutive steps with a non-finite loss (each is skipped; default 5)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write the metrics and sample grids to <out>/tb/ for TensorBoard "
                        "(needs pip install 'jdm_fast[tensorboard]')")
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Preset + explicitly given flags -> a validated TrainConfig."""
    base = get_preset(args.preset)
    changes = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    # Checkpoints store absolute data paths, so sample/evaluate find them from any directory.
    if changes.get("data_dir"):
        changes["data_dir"] = str(Path(changes["data_dir"]).resolve())
    if changes.get("dataset") and changes["dataset"].lower() not in DATASET_INFO and Path(changes["dataset"]).is_dir():
        changes["dataset"] = str(Path(changes["dataset"]).resolve())
    if changes.get("resume") is False:
        del changes["resume"]
    if changes.get("grad_clip") == 0:
        changes["grad_clip"] = None
    model = base.model
    if args.dropout is not None:
        model = dataclasses.replace(model, unet=dataclasses.replace(model.unet, dropout=args.dropout))
    if args.classifier_weight is not None:
        model = dataclasses.replace(model, classifier_weight=args.classifier_weight)
    if args.objective is not None:
        model = with_objective(model, args.objective)
    if args.classifier_input is not None:  # after the objective: an explicit input is checked against it
        model = dataclasses.replace(model, classifier_input=args.classifier_input)
    return dataclasses.replace(base, model=model, **changes)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        p.error(str(e))
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:
        print(f"config ({cfg.preset}):\n{cfg.to_json()}", flush=True)
    from jdm_fast.checkpoint import CheckpointError, StorageError, storage_error
    from jdm_fast.training.loop import NonFiniteLossError, Preempted, train  # heavy imports after validation
    from jdm_fast.training.tensorboard import TensorBoardMissing

    try:
        train(cfg)
    except Preempted as e:  # SIGTERM / SIGINT / SIGUSR1: the step finished and was checkpointed
        if main_process:
            print(str(e), file=sys.stderr, flush=True)
        return e.exit_status
    except (ValueError, FileNotFoundError, FileExistsError, TensorBoardMissing) as e:  # bad input: name it, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # any other refused write (metrics, sample grids): one line, no traceback
        path = e.filename or cfg.out
        print(f"error: {storage_error(e, path) if e.errno is not None else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
