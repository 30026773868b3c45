"""The torch / Triton version matrix (issue 15): ``nox`` runs every session, ``nox -s device`` one.

Sessions (each in its own virtual environment, on a copy of the tree, CPU only):
- ``floor``: the lowest torch and triton that setup.py / pyproject.toml allow;
- ``device``: the H200 machine's Python 3.12, torch 2.11.0 and triton 3.6.0, without DALI, apex,
  mlxtend or diffusers (what gpu_check meets there); ``nox -s device -- --rehearse`` also runs
  ``benchmarks/gpu_check --rehearse`` in it;
- ``current``: what the README's install command resolves today.

Each session builds jdm_fast._C (CPU kernels: the CUDA toolkit here is 13.0, older torch builds
reject it) and runs the Triton interpreter parity tests, the sm_80 / sm_90 ahead-of-time compiles
and static resources, the op tests (with every op's fake kernel against its real one), the
compiled CUDA training step rehearsed on fake CUDA tensors (benchmarks/cuda_rehearsal.py: Dynamo,
AOTAutograd and Inductor down to sm_90 kernels, ~3-4 minutes), and a 20-step CPU training smoke
run on a generated class-folder dataset. NumPy is held below 2.4 where the Triton interpreter still converts
one-element arrays with int(), which NumPy 2.4 refuses (Triton <= 3.6).

Needs python3.11 and python3.12 on PATH (with pyenv: PATH=$(pyenv root)/versions/3.12.1/bin:...).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.options.sessions = ["floor", "device", "current"]
nox.options.reuse_existing_virtualenvs = True
ROOT = Path(__file__).resolve().parent
COMMON = ["scipy", "pillow", "tqdm", "safetensors", "pytest", "pytest-benchmark", "ninja", "setuptools", "wheel"]
TESTS = {
    "interpreter parity": ["tests/kernels/", "-k", "not aot and not resources and not occupancy"],
    "AOT compiles": ["tests/kernels/", "-k", "aot"],
    "ops": ["tests/test_noise_ops.py", "tests/test_group_norm_op.py", "tests/test_attention_op.py",
            "tests/test_group_norm_cpu.py", "tests/test_step.py", "tests/test_fake_kernels.py"],
    "compiled CUDA step rehearsal": ["tests/test_fake_cuda.py", "tests/test_cuda_rehearsal.py"],
}
SMOKE = """
import numpy as np, pathlib, sys
from PIL import Image
root = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
for c in range(10):
    (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(8):
        img = (rng.random((28, 28)) * 64).astype(np.uint8)
        img[c + 4:c + 12, 6:22] = 255  # a class-dependent bar
        Image.fromarray(img, mode="L").save(root / str(c) / f"{i}.png")
"""


def _run_matrix_session(session: nox.Session, packages: list[str]) -> None:
    session.install(*packages, *COMMON)
    tmp = Path(session.create_tmp()).resolve()  # absolute: the session changes directory below
    work = tmp / "tree"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".nox", "build", "*.so", "__pycache__", "runs",
                                                             "gpu_check_out", ".whl", ".gl"))
    session.chdir(work)
    env = {"JDM_FAST_CUDA": "0", "MAX_JOBS": str(os.cpu_count() or 1)}
    session.run("python", "setup.py", "-q", "build_ext", "--inplace", env=env)
    session.run("python", "-c", "import torch, triton, numpy; print('torch', torch.__version__, '| triton', "
                "triton.__version__, '| numpy', numpy.__version__)")
    shim = work / ".pyshim"  # jdm_fast.kernels lives in ./kernels (setup.py package_dir)
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(
        "import importlib.abc, importlib.util, sys\n"
        f"_DIR = {str(work / 'kernels')!r}\n"
        "class _K(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name != 'jdm_fast.kernels':\n"
        "            return None\n"
        "        return importlib.util.spec_from_file_location(name, _DIR + '/__init__.py', "
        "submodule_search_locations=[_DIR])\n"
        "sys.meta_path.insert(0, _K())\n")
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{work}", "JDM_FAST_CUDA": "0"}  # the build above had no CUDA
    failed = []

    def stage(name, *cmd, **kw):  # every stage runs; the session fails at the end naming the failures
        session.log(f"== {name}")
        try:
            session.run(*cmd, env=env, **kw)
        except CommandFailed:
            failed.append(name)

    for name, args in TESTS.items():
        stage(name, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args)
    session.log("== static resources (reported, not a pass criterion: register allocation differs by Triton "
                "version; CI asserts them for its own)")
    try:
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kernel_resources.py",
                    env=env)
    except CommandFailed:
        session.log("static resources: spills or occupancy below the floor with this Triton (see above)")
    data, out = tmp / "folder_data", tmp / "smoke_run"
    shutil.rmtree(out, ignore_errors=True)
    session.run("python", "-c", SMOKE, str(data), env=env)
    stage("20-step CPU training smoke", "python", "-m", "jdm_fast.train", "--preset", "tiny", "--dataset", str(data),
          "--steps", "20", "--device", "cpu", "--out", str(out))
    if "--rehearse" in session.posargs:
        env["PYTHON"] = "python"
        stage("benchmarks/gpu_check --rehearse", "bash", "benchmarks/gpu_check", "--rehearse", str(tmp / "rehearsal"),
              external=True)
    if failed:
        session.error(f"failed: {', '.join(failed)}")


@nox.session(python="3.11")
def floor(session: nox.Session) -> None:
    """torch 2.7 / triton 3.3: the lowest versions install_requires admits (torch 2.6 / triton 3.2 failed
    the interpreter parity of the looped GroupNorm kernels, so the floor was raised; README)."""
    _run_matrix_session(session, ["torch==2.7.*", "triton==3.3.*", "numpy<2.4"])


@nox.session(python="3.12")
def device(session: nox.Session) -> None:
    """The H200 machine's versions (Python 3.12, torch 2.11.0, triton 3.6.0; no DALI/apex/mlxtend/diffusers)."""
    _run_matrix_session(session, ["torch==2.11.0", "triton==3.6.0", "numpy<2.4"])


@nox.session(python="3.11")
def current(session: nox.Session) -> None:
    """What `pip install -e ".[dev]"` resolves today (no version pins)."""
    _run_matrix_session(session, ["torch", "triton", "numpy"])
