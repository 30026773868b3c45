"""``python -m jdm_fast.convert to-diffusers``: the exported diffusers UNet2DModel predicts the same
noise as our UNet (fp32, relative 1e-5), the DDPMScheduler carries our betas, diffusers' schedulers
step as ours do, and what UNet2DModel cannot express is refused with the reason.

Models are small and every weight is random (zero-initialised layers included: with the output conv
and attention projections at zero, a wrong map of them could not fail). They are saved the way the
trainer saves them (its safetensors export, its checkpoint dict)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jdm_fast.checkpoint import save_checkpoint
from jdm_fast.convert import to_diffusers
from jdm_fast.convert.__main__ import main
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.diffusion.samplers import ancestral_step, ddim_step
from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.joint import JointConfig, JointDiffusion
from jdm_fast.training.config import PRESETS, get_preset
from jdm_fast.training.loop import export_safetensors

TOL = 1e-5
README = Path(__file__).resolve().parents[1] / "README.md"

# name -> (UNetConfig, schedule, T)
CONFIGS = {
    # the digits preset's layout: num_head_channels, scale-shift, 8 groups, attention at 7 + middle
    "digits": (PRESETS["digits"].model.unet, "jdm_linear", 500),
    # CIFAR layout (channel_mult (1,2,2,2), attention at 16 and 8), narrow, num_head_channels
    "cifar_head_channels": (UNetConfig(image_size=32, in_channels=3, model_channels=32, channel_mult=(1, 2, 2, 2),
                                       num_res_blocks=2, attention_resolutions=(16, 8), num_heads=None,
                                       num_head_channels=16, dropout=0.3, num_groups=8), "linear", 1000),
    # additive timestep conditioning; num_heads over equal widths (32, 32, middle 32)
    "no_scale_shift": (UNetConfig(image_size=16, in_channels=3, model_channels=16, channel_mult=(1, 2, 2),
                                  num_res_blocks=2, attention_resolutions=(8, 4), num_heads=2,
                                  use_scale_shift_norm=False, dropout=0.1, num_groups=8), "cosine", 100),
    # attention at every level, the top one included; channel widths 16, 16, 32
    "attention_everywhere": (UNetConfig(image_size=16, in_channels=1, model_channels=16, channel_mult=(1, 1, 2),
                                        num_res_blocks=1, attention_resolutions=(16, 8, 4), num_heads=None,
                                        num_head_channels=8, dropout=0.0, num_groups=4), "jdm_linear", 200),
    # the tiny preset: attention only in the middle, 2 levels
    "tiny": (PRESETS["tiny"].model.unet, "jdm_linear", 50),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, zero-initialised ones included (weights ~ 1/sqrt(fan_in), norm scales
    around 1, biases and norm shifts around 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * r)
            else:
                p.copy_(0.3 * r)


def _model(ucfg: UNetConfig, schedule: str, T: int, seed: int = 0, objective: str = "joint") -> JointDiffusion:
    cfg = JointConfig(unet=ucfg, head=HeadConfig(num_classes=10, dropout=0.3), objective=objective)
    model = JointDiffusion(cfg, GaussianDiffusion(make_betas(schedule, T)))
    _randomise(model, seed)
    return model.eval()


def _train_config(model: JointDiffusion, schedule: str, T: int):
    return dataclasses.replace(get_preset("digits"), model=model.config, schedule=schedule, num_timesteps=T,
                               sample_steps=min(T, 10))


def _save_export(model, schedule, T, path, step=7):
    """The trainer's safetensors export (model_ema.safetensors)."""
    export_safetensors(model, path, _train_config(model, schedule, T), "ema", step)
    return path


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def _export(tmp_path, name, model, schedule, T, *extra):
    src = _save_export(model, schedule, T, tmp_path / f"{name}_ema.safetensors")
    out = tmp_path / f"{name}-diffusers"
    assert main(["to-diffusers", str(src), "--out", str(out), *extra]) == 0
    return out


def _ours_vs_diffusers(model, unet2d, T, batch=6, seed=1):
    u = model.config.unet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, u.in_channels, u.image_size, u.image_size, generator=g)
    t = torch.tensor([0, 1, T // 4, T // 2, T - 2, T - 1])[:batch]
    with torch.no_grad():
        ours = model.unet(x, t)
        theirs = unet2d(x, t).sample
    assert theirs.dtype == torch.float32 and bool(torch.isfinite(theirs).all())
    return float((ours.double() - theirs.double()).abs().max() / ours.double().abs().max()), ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exported_unet_predicts_our_noise(diffusers, tmp_path, name):
    ucfg, schedule, T = CONFIGS[name]
    model = _model(ucfg, schedule, T)
    out = _export(tmp_path, name, model, schedule, T)
    unet2d = diffusers.UNet2DModel.from_pretrained(out / "unet", low_cpu_mem_usage=False).eval()
    err, ours = _ours_vs_diffusers(model, unet2d, T)
    print(f"{name}: max relative error {err:.2e}")
    assert err <= TOL, f"{name}: exported UNet2DModel differs from ours by {err:.3g} (relative)"
    assert float(ours.abs().max()) > 0.1  # random weights everywhere: the prediction is not ~0

    # the scheduler: our betas, hence our alphas_cumprod (diffusers computes them in float32)
    sched = diffusers.DDPMScheduler.from_pretrained(out / "scheduler")
    abar = GaussianDiffusion(make_betas(schedule, T)).alphas_cumprod
    assert sched.config.num_train_timesteps == T
    assert torch.equal(sched.betas, make_betas(schedule, T).float())
    # diffusers keeps betas and alphas_cumprod in float32: its cumulative product is exact to 1e-5 of
    # the float64 one of those float32 betas, and to 1e-4 of ours (the cosine schedule's last beta,
    # 0.999, costs 1.3e-5 on its own: 1 - float32(0.999) is 1e-3 * (1 + 4e-5))
    abar32 = torch.cumprod(1.0 - sched.betas.double(), 0)
    assert float(((sched.alphas_cumprod.double() - abar32) / abar32).abs().max()) <= TOL
    assert float(((sched.alphas_cumprod.double() - abar) / abar).abs().max()) <= 1e-4
    assert (sched.config.prediction_type, sched.config.clip_sample, sched.config.clip_sample_range,
            sched.config.variance_type) == ("epsilon", True, 1.0, "fixed_small")
    # x0 clipping for the multistep solvers: thresholding at s = clamp(quantile, 1, sample_max_value = 1) = 1
    assert sched.config.thresholding and sched.config.sample_max_value == 1.0

    info = json.loads((out / "jdm_fast_export.json").read_text())
    assert info["weights"] == "ema" and info["step"] == 7 and info["num_timesteps"] == T
    assert info["schedule"] == schedule and info["check"]["noise_prediction_max_rel_error"] <= TOL
    assert "classifier_head" in info["not_exported"]
    assert UNetConfig(**info["unet_config"]) == ucfg
    # and the pipeline folder loads as one
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, diffusers.UNet2DModel) and isinstance(pipe.scheduler, diffusers.DDPMScheduler)


def test_checkpoint_weights_choice(diffusers, tmp_path):
    """A checkpoint.pt exports its EMA weights by default and its raw ones with --weights raw."""
    ucfg, schedule, T = CONFIGS["attention_everywhere"]
    raw, ema = _model(ucfg, schedule, T, seed=1), _model(ucfg, schedule, T, seed=2)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"config": dataclasses.asdict(_train_config(raw, schedule, T)), "step": 3,
                           "model": raw.state_dict(), "ema": ema.state_dict()})
    for which, ref in (("ema", ema), ("raw", raw)):
        out = tmp_path / which
        args = [] if which == "ema" else ["--weights", "raw"]
        assert main(["to-diffusers", str(path), "--out", str(out), *args]) == 0
        unet2d = diffusers.UNet2DModel.from_pretrained(out / "unet", low_cpu_mem_usage=False).eval()
        assert _ours_vs_diffusers(ref, unet2d, T)[0] <= TOL
        assert json.loads((out / "jdm_fast_export.json").read_text())["weights"] == which
    with pytest.raises(SystemExit, match="holding the ema weights only"):
        main(["to-diffusers", str(_save_export(ema, schedule, T, tmp_path / "m.safetensors")),
              "--out", str(tmp_path / "x"), "--weights", "raw"])


def test_diffusers_schedulers_step_as_ours(diffusers, tmp_path):
    """The exported scheduler config drives diffusers' samplers with our math: a DDPMScheduler step is
    our ancestral step (fixed-small variance, x0 clipped to [-1, 1]), DPM-Solver++ of order 1 is our
    DDIM (eta 0, x0 clipped: the config's thresholding with sample_max_value 1) at the same timesteps,
    and 20 steps of the default DPM-Solver++ 2M start with that same step and stay finite."""
    ucfg, schedule, T = CONFIGS["digits"]
    model = _model(ucfg, schedule, T)
    out = _export(tmp_path, "digits", model, schedule, T)
    unet2d = diffusers.UNet2DModel.from_pretrained(out / "unet", low_cpu_mem_usage=False).eval()
    diffusion = model.diffusion
    shape = (3, ucfg.in_channels, ucfg.image_size, ucfg.image_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def eps(x, t):
        return unet2d(x, torch.full((x.shape[0],), int(t))).sample

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    with torch.no_grad():
        # DDPM: one ancestral step at t = 37 with the same noise
        ddpm = diffusers.DDPMScheduler.from_pretrained(out / "scheduler")
        ddpm.set_timesteps(T)
        x, t = x_T * 0.5, 37
        e = eps(x, t)
        theirs = ddpm.step(e, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        ours = ancestral_step(diffusion, e, x, torch.full((3,), t), noise=noise)
        assert rel(theirs, ours) <= TOL

        # DPM-Solver++ first order == our DDIM (eta 0, x0 clipped)
        dpm1 = diffusers.DPMSolverMultistepScheduler.from_pretrained(out / "scheduler", solver_order=1,
                                                                     algorithm_type="dpmsolver++")
        dpm1.set_timesteps(8)
        ts = [int(t) for t in dpm1.timesteps]
        assert ts[0] == T - 1  # "trailing" spacing: sampling starts at T-1, as ours does
        x_theirs, x_ours = x_T.clone(), x_T.clone()
        for k, t in enumerate(ts):
            x_theirs = dpm1.step(eps(x_theirs, t), t, x_theirs).prev_sample
            t_prev = ts[k + 1] if k + 1 < len(ts) else -1
            x_ours = ddim_step(diffusion, eps(x_ours, t), x_ours, torch.full((3,), t), torch.full((3,), t_prev))
        assert rel(x_theirs, x_ours) <= 1e-4  # 8 steps of float32 coefficient rounding on both sides

        # DPM-Solver++ 2M, 20 steps (what the README runs): its first step is the same DDIM step
        dpm = diffusers.DPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
        dpm.set_timesteps(20)
        ts = [int(t) for t in dpm.timesteps]
        x = x_T.clone()
        for k, t in enumerate(ts):
            e = eps(x, t)
            x = dpm.step(e, t, x).prev_sample
            if k == 0:
                first = ddim_step(diffusion, e, x_T, torch.full((3,), t), torch.full((3,), ts[1]))
                assert rel(x, first) <= TOL
        assert x.shape == shape and bool(torch.isfinite(x).all())


def test_refusals_name_the_reason(tmp_path):
    """What UNet2DModel cannot express is refused before anything is written (no diffusers needed)."""
    # num_heads fixed over different widths: head sizes 4 (level 0, 16 channels) and 8 (32 channels)
    heads = UNetConfig(image_size=16, in_channels=1, model_channels=16, channel_mult=(1, 2),
                       num_res_blocks=1, attention_resolutions=(16,), num_heads=4, num_groups=4)
    with pytest.raises(to_diffusers.NotExpressible, match="attention_head_dim"):
        to_diffusers.unet2d_config(heads)
    wide = UNetConfig(image_size=16, in_channels=1, model_channels=16, channel_mult=(2, 2),
                      num_res_blocks=1, attention_resolutions=(), num_heads=1, num_groups=4)
    with pytest.raises(to_diffusers.NotExpressible, match=r"channel_mult\[0\]=2"):
        to_diffusers.unet2d_config(wide)
    with pytest.raises(to_diffusers.NotExpressible, match="classifier-only"):
        to_diffusers.check_expressible(CONFIGS["tiny"][0], generates=False)
    for name, preset in PRESETS.items():  # every preset exports
        to_diffusers.unet2d_config(preset.model.unet)

    pytest.importorskip("diffusers")
    src = _save_export(_model(heads, "jdm_linear", 50), "jdm_linear", 50, tmp_path / "h.safetensors")
    with pytest.raises(SystemExit, match="num_heads=4 .* head sizes") as e:
        main(["to-diffusers", str(src), "--out", str(tmp_path / "out")])
    assert "to-diffusers" in str(e.value) and not (tmp_path / "out").exists()
    cls = _model(CONFIGS["tiny"][0], "jdm_linear", 50, objective="classifier")
    src = _save_export(cls, "jdm_linear", 50, tmp_path / "c.safetensors")
    with pytest.raises(SystemExit, match="objective 'classifier'"):
        main(["to-diffusers", str(src), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_out_folder_is_not_clobbered(diffusers, tmp_path):
    ucfg, schedule, T = CONFIGS["tiny"]
    model = _model(ucfg, schedule, T)
    src = _save_export(model, schedule, T, tmp_path / "m.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["to-diffusers", str(src), "--out", str(out)])
    assert (out / "mine.txt").read_text() == "keep"
    assert main(["to-diffusers", str(src), "--out", str(out), "--overwrite"]) == 0
    assert (out / "unet").is_dir() and not (out / "mine.txt").exists()
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["to-diffusers", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o2")])


def test_missing_diffusers_is_a_clear_error(tmp_path, monkeypatch):
    ucfg, schedule, T = CONFIGS["tiny"]
    src = _save_export(_model(ucfg, schedule, T), schedule, T, tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(SystemExit, match="pip install diffusers"):
        main(["to-diffusers", str(src), "--out", str(tmp_path / "out")])


def _readme_example(text: str) -> tuple[list[str], str]:
    """README's export example: the to-diffusers command line and the sampling program (the
    heredoc of the bash block that uses DPMSolverMultistepScheduler)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    line = next(ln for b in blocks for ln in b.splitlines() if "jdm_fast.convert to-diffusers" in ln)
    program = next(m.group(1) for b in blocks if "DPMSolverMultistepScheduler" in b
                   for m in [re.search(r"<<'EOF'\n(.*?)^EOF$", b, flags=re.S | re.M)] if m)
    return shlex.split(line.split("#")[0]), program


def test_readme_export_example_runs(diffusers, tmp_path, monkeypatch):
    """README's export command and DPM-Solver++ sampling program run as written, on a digits-preset
    model with random weights where the README's run would be."""
    argv, program = _readme_example(README.read_text())
    assert argv[:4] == ["python", "-m", "jdm_fast.convert", "to-diffusers"]
    ucfg, schedule, T = CONFIGS["digits"]
    src = tmp_path / argv[4]
    src.parent.mkdir(parents=True)
    _save_export(_model(ucfg, schedule, T), schedule, T, src)
    monkeypatch.chdir(tmp_path)
    assert main(argv[3:]) == 0
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README's sampling example failed:\n{proc.stderr[-3000:]}"
    classes = re.search(r"classes: \[([\d, ]+)\]", proc.stdout)
    assert classes and len(classes.group(1).split(",")) == 16
    assert (tmp_path / "dpm_solver_20_steps.png").is_file()
