"""Sample from a trained joint model: ``python -m jdm_fast.sample --checkpoint runs/digits/checkpoint.pt
--mode uncond|cond|guided|counterfactual [...]``.

Modes (all steer with the model's own head; see jdm_fast/generation/steering.py):
- uncond: plain DDIM (``--steps N``) or the full ancestral chain (``--steps full``).
- cond: representation-optimized sampling (PAPER.md). At each reverse step the encoder
  representations z of x_t (middle output + every skip) take ``--inner-steps`` gradient steps that
  LOWER the head's cross-entropy for the target, then the decoder turns them into eps. By default
  the head is fed as it was trained (``--head-input x0``): it reads the model's own clean-image
  prediction x0_hat = (x_t - sqrt(1 - abar_t) decode(z)) / sqrt(abar_t), encoded at t = 0; each step
  is ``alpha * rms(z) * g / rms(g)`` per example (``--raw-step``: the paper's raw ``alpha * g``).
  The head reads ``--head-views`` copies of x0_hat under its training augmentation (digits: 2-pixel
  shifts) and the loss is their mean, the expectation the head was trained on. Ancestral by default.
  ``--head-input xt`` is PAPER.md literally (head on x_t's own pooled representations, off the
  training distribution of a head trained on clean images); ``--authors-variant`` adds the authors' two flaws (+alpha, away
  from the target; raw t fed to the head) to show the difference.
- guided: pixel-space classifier guidance, ``--guidance-scale`` times grad_{x_t} log p(y | .): on a
  head also trained on x_t (``--classifier-input both``, the digits preset) the head on x_t's own
  features at t (``--head-input xt``, the default there; ancestral by default), otherwise the head
  on x0_hat(x_t) through the whole UNet and the t = 0 encoder pass, with the same head views
  (``--head-input x0``; DDIM by default).
- counterfactual: test-split images (or ``--images``) noised to ``--t-start`` (fraction of T) and
  run back to t = 0 towards ``--class`` (default: a different class per image), steered as guided
  (``--steer guided``, the default on a head trained on x_t; ancestral) or as cond (``--steer
  cond``; deterministic DDIM, which stays closer to the original).

Writes PNG grids and ``samples.npz`` (``images`` uint8 N x H x W x C, ``labels`` the target class
of each image or -1) to ``--out``; counterfactual mode also writes ``originals``,
``probs_before``/``probs_after`` (the head's softmax), ``t_start`` and ``alpha`` per row, one grid
``counterfactuals_t<t>_a<alpha>.png`` per setting (rows: original | counterfactual | difference,
green = ink added, red = ink removed) and prints the head's probabilities before and after.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jdm_fast.data.images import from_uint8, save_grid, to_uint8
from jdm_fast.generation import (
    HEAD_INPUTS,
    MODES,
    SAMPLERS,
    STEERS,
    SampleSettings,
    balanced_labels,
    check_class,
    counterfactuals,
    default_head_input,
    generate,
    guides,
    head_probabilities,
    load_joint_model,
    sampler_for,
)
from jdm_fast.training.config import check_device
from jdm_fast.training.precision import amp_dtype

DEFAULTS = SampleSettings()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jdm_fast.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (runs/<preset>/checkpoint.pt) or a "
                   "safetensors export (model_ema.safetensors / model.safetensors)")
    p.add_argument("--mode", choices=MODES, default="uncond")
    p.add_argument("--num", type=int, default=64, help="images to generate (counterfactual: test images to explain)")
    p.add_argument("--class", dest="cls", type=int, help="target class (default: balanced over all classes; "
                   "counterfactual: a class other than the image's label)")
    p.add_argument("--steps", default="50", help="DDIM steps (or respaced ancestral steps), or 'full' for the "
                   "full T-step ancestral chain (default 50)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="default: ancestral for cond (its fresh noise each step washes out texture the steering "
                        "adds), ddim for uncond, guided and counterfactual; ancestral with --steps full")
    p.add_argument("--alpha", type=float, nargs="+", default=[DEFAULTS.alpha],
                   help="representation step of cond/counterfactual (counterfactual: several values sweep); with "
                        "the default normalised step a fraction of the representations' RMS per example, with "
                        f"--raw-step the paper's raw alpha * dCE/dz (order 1e2..1e3) (default {DEFAULTS.alpha:g})")
    p.add_argument("--head-input", choices=HEAD_INPUTS,
                   help="what the head reads while steering (cond, guided, counterfactual): x0 = the model's own "
                        "clean-image prediction x0_hat(x_t) encoded at t = 0; xt = x_t's own features at t (cond: "
                        "PAPER.md literally, the pooled representations). Default: xt for guided when the head was "
                        "also trained on x_t (--classifier-input xt or both: the digits preset), x0 otherwise")
    p.add_argument("--steer", choices=STEERS,
                   help="counterfactual: steer like --mode cond (representation steps, --alpha) or like --mode "
                        "guided (classifier guidance, --guidance-scale). Default: guided when the head was also "
                        "trained on x_t (the digits preset), cond otherwise")
    p.add_argument("--raw-step", action="store_true",
                   help="cond/counterfactual: the paper's raw step z - alpha * dCE/dz instead of the normalised "
                        "z - alpha * rms(z) * g / rms(g)")
    p.add_argument("--inner-steps", type=int, default=DEFAULTS.inner_steps,
                   help=f"gradient steps on the representations per reverse step (default {DEFAULTS.inner_steps})")
    p.add_argument("--head-views", type=int, default=DEFAULTS.head_views,
                   help="augmented copies of x0_hat the head reads per steering gradient, drawn from the head's "
                        "training augmentation (digits: 2-pixel shifts); the loss is their mean. 1 = the "
                        f"unaugmented image only; a model trained without augmentation has one (default "
                        f"{DEFAULTS.head_views})")
    p.add_argument("--steer-until", type=float, default=DEFAULTS.t_min,
                   help="steer only at timesteps t >= this fraction of T; the last reverse steps then just denoise "
                        f"(cond, guided, counterfactual; default {DEFAULTS.t_min:g}, 0 = every step)")
    p.add_argument("--purify", type=float,
                   help="cond/guided: noise each finished sample again to this fraction of T and denoise it "
                        f"without steering (round(steps * F) steps of the mode's sampler; default {DEFAULTS.purify:g}, "
                        "0 with --authors-variant or --head-input xt; 0 = off)")
    p.add_argument("--retries", type=int,
                   help="cond/guided/counterfactual: rounds that redraw (fresh noise) each sample whose head reads "
                        "its target with probability < --accept (mean over the head views), keeping the more "
                        f"confident copy (default {DEFAULTS.retries}, 0 with --authors-variant or --head-input xt; "
                        "0 = no redraws)")
    p.add_argument("--recheck", type=int,
                   help="cond/guided with --purify: the confidence --accept reads is also the lowest over this many "
                        f"copies purified once more (a class the purification does not keep is redrawn; default "
                        f"{DEFAULTS.recheck}, 0 without --purify)")
    p.add_argument("--accept", type=float, default=DEFAULTS.accept,
                   help=f"head confidence a sample needs not to be redrawn (with --retries; default {DEFAULTS.accept:g})")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="run the reverse process under bf16 autocast where the hardware has fast bf16 (a CPU with "
                        "AVX512-BF16/AMX, a bf16 GPU), fp16 on older GPUs, fp32 otherwise (the choice is printed; "
                        "default on, --no-amp: fp32)")
    p.add_argument("--guidance-scale", type=float, default=DEFAULTS.guidance_scale, help="classifier-guidance scale (guided)")
    p.add_argument("--t-start", type=float, nargs="+", default=[0.3],
                   help="counterfactual noise level(s) as a fraction of T, in (0, 1]")
    p.add_argument("--images", nargs="+", help="counterfactual: image files instead of the test split")
    p.add_argument("--authors-variant", action="store_true",
                   help="cond/counterfactual: the authors' update (+alpha, away from the target) with the raw "
                        "timestep fed to the head on x_t's representations, to show the difference")
    p.add_argument("--data-dir", help="where the model's dataset lives now (default: the path in the checkpoint; "
                   "counterfactuals read its test split)")
    p.add_argument("--out", help="output folder (default <checkpoint folder>/samples_<mode>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA (default) or --no-ema "
                   "(= --raw) weights")
    p.add_argument("--raw", dest="ema", action="store_false", help="use the raw (non-EMA) weights")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    return p


def parse_steps(text: str) -> int | None:
    if text == "full":
        return None
    try:
        steps = int(text)
    except ValueError:
        raise ValueError(f"--steps must be a positive int or 'full', got {text!r}") from None
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    return steps


def validate(args: argparse.Namespace) -> None:
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag, values in (("--alpha", args.alpha), ("--t-start", args.t_start), ("--guidance-scale", [args.guidance_scale]),
                         ("--steer-until", [args.steer_until])):
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{flag} must be finite, got {bad[0]}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: give a folder to write the samples into")
    check_device(args.device)
    for t in args.t_start:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"--t-start must lie in (0, 1] (a fraction of T), got {t}")
    if args.purify is not None:
        if not 0.0 <= args.purify < 1.0:
            raise ValueError(f"--purify must lie in [0, 1) (a fraction of T), got {args.purify}")
        if args.mode not in ("cond", "guided"):
            raise ValueError(f"--purify is for --mode cond and guided, not {args.mode}")
    if args.retries is not None:
        if args.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {args.retries}")
        if args.mode == "uncond":
            raise ValueError("--retries redraws samples the head is unsure of: it is for the steered modes (cond, "
                             "guided, counterfactual), not uncond")
    if args.recheck is not None and args.recheck < 0:
        raise ValueError(f"--recheck must be >= 0, got {args.recheck}")
    if args.steer is not None and args.mode != "counterfactual":
        raise ValueError(f"--steer chooses how counterfactuals are steered; --mode {args.mode} has its own "
                         "(cond: representation steps, guided: classifier guidance)")
    if not 0.0 <= args.accept <= 1.0:
        raise ValueError(f"--accept must lie in [0, 1] (a probability), got {args.accept}")
    if args.inner_steps < 1:
        raise ValueError(f"--inner-steps must be >= 1, got {args.inner_steps}")
    if args.head_views < 1:
        raise ValueError(f"--head-views must be >= 1, got {args.head_views}")
    if not 0.0 <= args.steer_until < 1.0:
        raise ValueError(f"--steer-until must lie in [0, 1), got {args.steer_until}")
    if min(args.alpha) < 0 or args.guidance_scale < 0:
        raise ValueError("--alpha and --guidance-scale must be >= 0")
    if args.mode != "counterfactual" and (len(args.alpha) > 1 or len(args.t_start) > 1 or args.images):
        raise ValueError("several --alpha/--t-start values and --images are for --mode counterfactual")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint: no checkpoint at {args.checkpoint}")


def resolve_defaults(args: argparse.Namespace, noise_aware: bool) -> None:
    """Fill in the flags whose default depends on the mode and on the model (``noise_aware``: its
    head was also trained on x_t, ``JointConfig.noise_aware_head``). ``--head-input``: xt for
    guided on such a model (classifier guidance with a noise-aware classifier), x0 otherwise.
    ``--steer`` (counterfactual): guided on such a model, cond otherwise; guided counterfactuals
    read the head as mode guided does.
    ``--purify`` / ``--retries``: the defaults of the modes they apply to, 0 elsewhere and for the
    literal variants (``--authors-variant``, or ``--head-input xt`` on a head trained on clean
    images only), which show the published update alone."""
    if args.steer is None:
        args.steer = "guided" if args.mode == "counterfactual" and noise_aware else "cond"
    if args.head_input is None:
        args.head_input = default_head_input(args.mode, noise_aware, args.steer)
    literal = args.authors_variant or (args.head_input == "xt" and not noise_aware)
    if args.purify is None:
        args.purify = DEFAULTS.purify if args.mode in ("cond", "guided") and not literal else 0.0
    if args.retries is None:
        args.retries = 0 if args.mode == "uncond" or literal else DEFAULTS.retries
    if args.recheck and not args.purify:
        raise ValueError("--recheck re-purifies the samples: it needs --purify > 0 (--mode cond or guided)")
    if args.recheck is None:
        args.recheck = DEFAULTS.recheck if args.purify else 0


def load_images(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"--images: no file at {p}")
        img = Image.open(p).convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
        a = np.asarray(img, dtype=np.uint8)
        out.append(a[..., None] if c == 1 else a)
    return np.stack(out)


def difference_rgb(x0: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
    """Signed change as an RGB image in [-1, 1]: green where the image got brighter, red darker."""
    d = (cf - x0).float().mean(dim=1, keepdim=True) / 2  # [-1, 1]
    rgb = torch.cat([(-d).clamp(min=0), d.clamp(min=0), torch.zeros_like(d)], dim=1)
    return rgb * 2 - 1


def counterfactual_grid(x0: torch.Tensor, cf: torch.Tensor, path: Path) -> Path:
    rgb = lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # noqa: E731
    rows = torch.stack([rgb(x0), rgb(cf), difference_rgb(x0, cf)], dim=1).flatten(0, 1)
    return save_grid(rows, path, nrow=3)


def _settings(args: argparse.Namespace, steps: int | None, sampler: str, alpha: float,
              amp: str | None = None) -> SampleSettings:
    return SampleSettings(steps=steps, sampler=sampler, alpha=alpha, guidance_scale=args.guidance_scale,
                          authors=args.authors_variant, head_input=args.head_input, normalize=not args.raw_step,
                          inner_steps=args.inner_steps, t_min=args.steer_until, head_views=args.head_views,
                          batch_size=args.batch_size, retries=args.retries, accept=args.accept, amp=amp,
                          purify=args.purify, recheck=args.recheck, steer=args.steer)


def run(args: argparse.Namespace, log=print) -> dict:
    validate(args)
    steps = parse_steps(args.steps)
    device = check_device(args.device)
    lm = load_joint_model(args.checkpoint, ema=args.ema, device=device)
    lm.require("generate", "sampling")
    if args.mode != "uncond":  # every other mode steers with the model's own head
        lm.require("classify", f"--mode {args.mode}")
    resolve_defaults(args, lm.model.config.noise_aware_head)
    sampler = args.sampler or ("ancestral" if steps is None else sampler_for(args.mode, _settings(args, steps, None, 0.0)))
    T = lm.model.diffusion.num_timesteps
    if steps is not None and steps > T:
        raise ValueError(f"--steps {steps} exceeds the model's {T} diffusion steps (use at most {T}, or 'full')")
    model, k = lm.model, lm.num_classes
    if args.cls is not None:
        check_class(args.cls, k)
    out = Path(args.out) if args.out else lm.path.parent / f"samples_{args.mode}"
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(args.seed)
    amp, why = amp_dtype(args.amp, device)
    steering = ""
    if args.mode != "uncond":
        how = "guidance" if guides(args.mode, args.steer) else "representation steps"
        on_xt = args.head_input == "xt" or args.authors_variant
        steering = f" | {how}, head on {'x_t' if on_xt else 'x0_hat(x_t) at t = 0'}"
    log(f"{lm.path} (step {lm.step}, {lm.weights} weights) | mode {args.mode}{steering} | {sampler} "
        f"{'full chain' if steps is None else f'{steps} steps'} | seed {args.seed} | precision {amp or 'fp32'}: {why}")
    start = time.perf_counter()
    if args.mode == "counterfactual":
        result = _run_counterfactuals(args, lm, steps, sampler, g, out, log, amp)
    else:
        settings = _settings(args, steps, sampler, args.alpha[0], amp)
        labels = None
        if args.mode != "uncond":
            labels = torch.full((args.num,), args.cls) if args.cls is not None else balanced_labels(args.num, k)
        stats: dict = {}
        x = generate(model, args.mode, args.num, labels, settings, g, device, augment=lm.augment, stats=stats)
        images = to_uint8(x)
        np.savez(out / "samples.npz", images=images,
                 labels=(labels.numpy() if labels is not None else np.full(args.num, -1)).astype(np.int64))
        grid = save_grid(x, out / "samples.png", nrow=k if labels is not None and args.cls is None else None)
        result = {"mode": args.mode, "num": args.num, "grid": str(grid)}
        if labels is not None and settings.retries:
            result.update(stats)
            rechecked = f", lowest over the sample and {settings.recheck} re-purified copies" if settings.recheck else ""
            log(f"redrew {stats['redrawn']} samples in up to {settings.retries} rounds (head confidence < "
                f"{settings.accept:g}{rechecked}); {stats['below_accept']} of {args.num} still below it")
        if labels is not None:
            head = head_probabilities(model, x).argmax(dim=1).cpu()
            result["head_target_rate"] = float((head == labels).float().mean())
            log(f"the model's own head reads {result['head_target_rate']:.1%} of the samples as their target class "
                "(an independent check: python -m jdm_fast.evaluate --samples)")
    result.update(seconds=time.perf_counter() - start, npz=str(out / "samples.npz"), checkpoint=str(lm.path),
                  objective=lm.objective, weights=lm.weights, step=lm.step, authors_variant=args.authors_variant,
                  head_input=args.head_input, steer=args.steer, raw_step=args.raw_step, alpha=args.alpha,
                  guidance_scale=args.guidance_scale, steer_until=args.steer_until, inner_steps=args.inner_steps,
                  head_views=args.head_views if lm.augment is not None else 1, sampler=sampler, steps=args.steps,
                  retries=args.retries, accept=args.accept, purify=args.purify, recheck=args.recheck,
                  precision=amp or "fp32")
    (out / "sample_summary.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {out / 'samples.npz'} and {out}/*.png in {result['seconds']:.1f}s")
    return result


def _run_counterfactuals(args, lm, steps, sampler, g, out: Path, log, amp: str | None = None) -> dict:
    from jdm_fast.data import load_dataset

    model, k = lm.model, lm.num_classes
    if args.images:
        imgs, labels = load_images(args.images, lm.image_shape), None
    else:
        test = load_dataset(lm.dataset, "test", args.data_dir or lm.data_dir)
        idx = np.random.default_rng(args.seed).permutation(len(test))[:args.num]
        imgs, labels = test.images[idx], torch.from_numpy(test.labels[idx]).long()
    x0 = from_uint8(imgs, lm.model.unet.input_conv.weight.device)
    before = head_probabilities(model, x0).argmax(dim=1).cpu()
    source = labels if labels is not None else before
    if args.cls is not None:
        targets = torch.full((len(x0),), args.cls)
    else:  # a different class per image, seeded
        shift = torch.randint(1, k, (len(x0),), generator=torch.Generator().manual_seed(args.seed))
        targets = (source + shift) % k
    rows, summary = [], []
    for t_start in args.t_start:
        for alpha in args.alpha:
            settings = _settings(args, steps, sampler, alpha, amp)
            cf = counterfactuals(model, x0, targets.to(x0.device), t_start, settings, g, augment=lm.augment)
            grid = counterfactual_grid(x0, cf.images, out / f"counterfactuals_t{t_start:g}_a{alpha:g}.png")
            flip = float(cf.flipped.float().mean())
            change = float(cf.mean_abs_change.mean())
            summary.append({"t_start": t_start, "alpha": alpha, "flip_rate": flip, "mean_abs_change": change,
                            "grid": str(grid), "redrawn": cf.redrawn, "below_accept": cf.below_accept})
            log(f"t_start {t_start:g} alpha {alpha:g}: head predicts the target for {flip:.1%} | mean |change| "
                f"{change:.3f} | {grid}" + (f" | redrew {cf.redrawn}, {cf.below_accept} still below --accept"
                                             if settings.retries else ""))
            for i in range(len(x0)):
                pb, pa = cf.probs_before[i], cf.probs_after[i]
                log(f"  #{i:3d} label {int(source[i]) if labels is not None else '-'} -> target {int(targets[i])}: "
                    f"p(target) {pb[targets[i]]:.2f} -> {pa[targets[i]]:.2f} | argmax {int(pb.argmax())} -> "
                    f"{int(pa.argmax())}")
            rows.append(cf)
    n = len(x0)
    np.savez(out / "samples.npz",
             images=np.concatenate([to_uint8(cf.images) for cf in rows]),
             labels=np.concatenate([cf.targets.cpu().numpy() for cf in rows]).astype(np.int64),
             originals=np.concatenate([to_uint8(cf.originals) for cf in rows]),
             source_labels=np.tile((labels if labels is not None else torch.full((n,), -1)).numpy(), len(rows)),
             probs_before=np.concatenate([cf.probs_before.cpu().numpy() for cf in rows]),
             probs_after=np.concatenate([cf.probs_after.cpu().numpy() for cf in rows]),
             t_start=np.concatenate([np.full(n, cf.t_start) for cf in rows]),
             alpha=np.concatenate([np.full(n, cf.alpha) for cf in rows]))
    return {"mode": "counterfactual", "num": n, "settings": summary}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
