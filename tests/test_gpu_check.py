"""benchmarks/gpu_check: valid bash, and on a machine without CUDA it stops at once with a clear
message (exit status 2) before building or writing anything. Its structure: the GPU caps fit 5
minutes, the steps run in the order that answers the main questions first, bad arguments stop it
at once, and what it leaves in OUTDIR is what a GPU machine sends back."""
import os
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check"


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check would really run")
def test_gpu_check_exits_early_without_cuda(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU is present" in proc.stderr
    assert not out.exists()


def _profiles(text: str) -> dict[str, dict[str, int]]:
    """The GPU run's step caps: the cold and the warm (--cache) line, each with the common line."""
    def caps(line: str) -> dict[str, int]:
        return {k: int(v) for k, v in re.findall(r"\b(CAP_[A-Z]+|PREAMBLE)=(\d+)\b", line)}
    lines = text.splitlines()
    cold = next(lines[i + 1] for i, line in enumerate(lines) if line.rstrip().endswith("# GPU, cold"))
    warm = next(lines[i + 1] for i, line in enumerate(lines) if line.rstrip().endswith("# GPU, warm (--cache)"))
    common = next(line for line in lines if line.startswith("CAP_BENCH="))
    return {"cold": {**caps(cold), **caps(common)}, "warm": {**caps(warm), **caps(common)}}


def test_gpu_caps_fit_five_minutes_by_construction():
    text = SCRIPT.read_text()
    for name, caps in _profiles(text).items():
        assert set(caps) == {"CAP_BUILD", "CAP_INDUCTOR", "CAP_ENGINE", "CAP_STRONG", "CAP_AMPC", "CAP_TESTS",
                             "CAP_NCHW", "CAP_EAGER", "CAP_BENCH", "CAP_REPORT", "CAP_REHEARSAL", "PREAMBLE"}, name
        assert sum(caps.values()) <= 290, name
        assert caps["CAP_REHEARSAL"] == 0  # the CUDA-step rehearsal runs with --rehearse only
        assert caps["CAP_ENGINE"] > 0 and caps["CAP_STRONG"] > 0 and caps["CAP_INDUCTOR"] > 0, name
    assert 'BUDGET="${GPU_CHECK_BUDGET_S:-290}"' in text
    assert "COLD_ENGINE=145 WARM_ENGINE=50" in text  # what the rehearsal's estimates are compared with
    profiles = _profiles(text)
    assert (profiles["cold"]["CAP_ENGINE"], profiles["warm"]["CAP_ENGINE"]) == (145, 50)
    assert profiles["warm"]["CAP_AMPC"] > 0 and profiles["warm"]["CAP_NCHW"] > 0  # a warm window runs all four


def test_gpu_check_step_order():
    """--rehearse: the CUDA-step rehearsal first; then the build, the Inductor op tests, the engine's
    compiled step alone, the strong baseline, the compiled AMP baseline, the other GPU tests."""
    text = SCRIPT.read_text()
    order = ['step rehearsal "$CAP_REHEARSAL" "$PY" benchmarks/cuda_rehearsal.py --out', "step build",
             "step tests_inductor", 'train engine "$CAP_ENGINE" engine --profile-steps 3',
             'train strong "$CAP_STRONG" baseline_strong --profile-steps 3',
             'train amp_compile "$CAP_AMPC" baseline_amp_compile', 'step gpu_tests', 'train nchw "$CAP_NCHW" engine_nchw',
             'train eager', 'step report']
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert '-m "gpu and not inductor"' in text and "-m inductor" in text
    assert 'TORCH_LOGS="graph_breaks,recompiles"' in text
    assert "&" not in text.split("train engine")[1].split("train strong")[0]  # nothing in the background


def test_gpu_check_rejects_bad_arguments_before_anything(tmp_path):
    for args, message in ((["--cache"], "--cache needs a FILE"), (["--frobnicate"], "unknown option"),
                          ([str(tmp_path / "a"), str(tmp_path / "b")], "one OUTDIR only")):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cache FILE" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_rehearsal_with_every_step_off_leaves_only_the_files_that_come_back(tmp_path):
    """Every cap 0 (each step skipped): the preamble, the summary and the packing alone. OUTDIR then
    holds summary.txt, logs.tar.gz and the compile cache given with --cache (a container is carried
    on as the run's own), nothing else; the summary lists them with their sizes."""
    cache = tmp_path / "previous.bin"
    with zipfile.ZipFile(cache, "w") as z:
        z.writestr("engine", b"artifacts")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.log").write_text("from an earlier run")  # not removed: not ours to remove
    env = dict(os.environ, **{f"GPU_CHECK_CAP_{c}": "0" for c in (
        "BUILD", "INDUCTOR", "ENGINE", "STRONG", "AMPC", "TESTS", "NCHW", "EAGER", "BENCH", "REPORT", "REHEARSAL")})
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearse", "--cache", str(cache), str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["compile_cache.bin", "logs.tar.gz", "stale.log", "summary.txt"]
    assert (out / "compile_cache.bin").read_bytes() == cache.read_bytes()
    summary = (out / "summary.txt").read_text()
    assert "gpu_check: PASSED" in summary and "train_engine" in summary and "skipped (cap 0)" in summary
    assert "logs.tar.gz" in summary and "MiB" in summary and "save_cache_artifacts / load_cache_artifacts: present" in summary
    with tarfile.open(out / "logs.tar.gz") as t:
        names = t.getnames()
    assert "work/versions.txt" in names and not any(n.startswith(("work/cache_in", "work/ext")) for n in names)
    assert summary.strip().splitlines()[-1] in proc.stdout
