"""The layer order of pyproject.toml's import-linter contracts holds, and the kernels import nothing
of jdm_fast above them.

import-linter walks the jdm_fast/ folder; kernels/ is installed as jdm_fast.kernels from outside
it, so its imports are checked here from the source."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_IMPORTS = set(sys.stdlib_module_names) | {"__future__", "torch", "triton"}


def test_import_linter_contracts_hold():
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is a dev dependency")
    # The graph is built from the installed jdm_fast: it must be this checkout (editable install).
    import jdm_fast

    assert Path(jdm_fast.__file__).resolve().parent == ROOT / "jdm_fast", "jdm_fast is not this checkout"
    status = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == cli.EXIT_STATUS_SUCCESS, "import-linter contracts broken (run `lint-imports` for the list)"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def kernel_import_violations(folder: Path) -> list[str]:
    """Imports of the kernel files that are not the standard library, torch, triton or a sibling
    kernel module."""
    bad = []
    for path in sorted(folder.glob("*.py")):
        for line, name in _imported_modules(path):
            top = name.split(".")[0]
            sibling = name.startswith(".") and not name.startswith("..")
            if not (sibling or top in KERNEL_IMPORTS or name.startswith("jdm_fast.kernels")):
                bad.append(f"{path.name}:{line} imports {name}")
    return bad


def test_kernels_import_only_torch_triton_and_each_other():
    assert kernel_import_violations(ROOT / "kernels") == []


def test_kernel_import_check_catches_an_upward_import(tmp_path):
    (tmp_path / "k.py").write_text("import torch\nfrom ._launch import launcher\nfrom ..ops import noise\n"
                                   "from jdm_fast.models import joint\nimport numpy\n")
    assert kernel_import_violations(tmp_path) == ["k.py:3 imports ..ops", "k.py:4 imports jdm_fast.models",
                                                  "k.py:5 imports numpy"]


def test_the_layers_contract_names_every_subpackage():
    """A new subpackage or top-level module must be placed in the order, not silently outside it."""
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    present = {f"jdm_fast.{p.stem}" for p in (ROOT / "jdm_fast").iterdir()
               if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert present == named
