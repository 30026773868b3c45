"""Every Python example of README.md runs as written.

The fenced ```python blocks are executed in order in one fresh interpreter, in one namespace (a
later block may use what an earlier one imported, as a reader following the README would), in an
empty temporary folder; nothing is stubbed. An example that drifts from the code fails here."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_examples():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3 and all(b.strip() for b in blocks)
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n```\n") == ["a = 1\n", "b = 2\n"]


def test_every_readme_python_example_runs(tmp_path):
    blocks = python_blocks(README.read_text())
    program = "\n".join(f"# --- README python block {i}\n{b}" for i, b in enumerate(blocks))
    (tmp_path / "readme_examples.py").write_text(program)
    proc = subprocess.run([sys.executable, "readme_examples.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"a README example failed:\n{proc.stderr[-3000:]}"
    assert "attention layers fused" in proc.stdout  # the diffusers example reached its end
