"""Loads the compiled extension ``jdm_fast._C`` (csrc/), once, when first imported.

Importing ``jdm_fast._C`` registers its ops (the noise-schedule ops, the CPU GroupNorm kernels)
under ``torch.ops.jdm_fast``. Where it is missing (not built, or built against another torch), the
op modules register pure-PyTorch fallbacks under the same names, and one warning here says so.

``JDM_FAST_DISABLE_C=1`` (read here, at import, and nowhere else) skips the import, so a test can
run a build without the extension in a subprocess.

- ``HAS_C``: the extension imported.
- ``WITH_CUDA``: it was built with its CUDA kernels.
- ``WHY_NOT``: why it did not import (None when it did).
"""
from __future__ import annotations

import importlib
import os
import warnings

__all__ = ["HAS_C", "WITH_CUDA", "WHY_NOT"]


def _load() -> tuple[bool, bool, str | None]:
    if os.environ.get("JDM_FAST_DISABLE_C") == "1":
        return False, False, "JDM_FAST_DISABLE_C=1"
    try:
        # The compiled extension (csrc/, the bottom layer); by module name, so that loading it is not
        # an import of the jdm_fast package's __init__ (which sits above every layer).
        _C = importlib.import_module("jdm_fast._C")
    except ImportError as e:
        return False, False, f"{type(e).__name__}: {e}"
    return True, bool(_C.WITH_CUDA), None


HAS_C, WITH_CUDA, WHY_NOT = _load()

if not HAS_C:
    warnings.warn(
        f"jdm_fast._C is not available ({WHY_NOT}); the ops it provides run their pure-PyTorch "
        "fallbacks (correct, slower). Rebuild with `pip install -e .` (see setup.py) to get the "
        "compiled CPU/CUDA kernels.", RuntimeWarning, stacklevel=2)
