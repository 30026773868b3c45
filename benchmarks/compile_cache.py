"""Inductor's compiled artifacts carried from one GPU window to the next (benchmarks/gpu_check).

``torch.compiler.save_cache_artifacts()`` (torch >= 2.7) serialises what this process compiled or
found in its caches (Inductor FX graphs with their Triton kernels, AOTAutograd entries, autotuning
results); ``torch.compiler.load_cache_artifacts(bytes)`` writes them into a fresh machine's local
caches, so the same compile there is mostly cache hits (Dynamo still traces). The artifacts only
match the same torch/Triton versions and GPU architecture.

gpu_check runs each compiled variant in its own process; each saves its artifacts as one entry of
a zip container (OUTDIR/compile_cache.bin, entries deflated: the artifacts compress ~5x), with an
entry ``_meta.json`` naming the torch and Triton versions and the device they were made with; each
process of the next run loads every entry before it compiles. ``python benchmarks/compile_cache.py
check FILE`` exits 0 when FILE was made with this machine's versions and device (gpu_check then
gives the compiled steps the short caps of a warm run). A file holding the raw bytes of
``save_cache_artifacts()`` is loaded as one entry. Nothing here is required: without the APIs, or
with an unreadable file, it says so and the run compiles from scratch.

A cache is code, not data: its entries are Inductor's generated Python modules and compiled
kernels, which the next compile imports and runs. Load only a file that gpu_check wrote on a
machine you trust (the GPU window before this one); never a cache from elsewhere.
"""
from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import torch

MAX_BYTES = 15 * 2**20  # what the GPU machine sends back: files of at most 16 MiB
META = "_meta.json"  # an entry that is not artifacts: what they were made with


def environment() -> dict:
    """What compiled artifacts depend on: torch and Triton versions, the device."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "triton": triton_version, "device": device}


def matches(path: Path) -> tuple[bool, str]:
    """(whether ``path`` was made with this machine's versions and device, why). A file without
    the metadata (raw bytes, an older container) is assumed to match."""
    try:
        entries = read_entries(path)
    except OSError as e:
        return False, f"cannot read {path}: {e}"
    if META not in entries:
        return True, f"{path}: no {META} (raw artifacts): assumed to match this machine"
    try:
        made = json.loads(entries[META])
    except ValueError:
        return False, f"{path}: unreadable {META}"
    here = environment()
    differ = {k: (made.get(k), v) for k, v in here.items() if made.get(k) != v}
    if differ:
        return False, f"{path} was made elsewhere: " + ", ".join(f"{k} {a} (here {b})" for k, (a, b) in differ.items())
    return True, f"{path} matches this machine ({here['device']}, torch {here['torch']}, triton {here['triton']})"


def available() -> bool:
    c = getattr(torch, "compiler", None)
    return hasattr(c, "save_cache_artifacts") and hasattr(c, "load_cache_artifacts")


def _missing() -> str:
    return (f"torch {torch.__version__} has no torch.compiler.save_cache_artifacts / load_cache_artifacts "
            "(torch >= 2.7): no compile cache")


def _count(info) -> str:
    """Artifacts in a CacheInfo (its fields differ between torch versions)."""
    artifacts = getattr(info, "artifacts", None)
    if isinstance(artifacts, dict):
        return str(sum(len(v) for v in artifacts.values()))
    return "?"


def read_entries(path: Path) -> dict[str, bytes]:
    """{entry name: artifact bytes} of a container; a non-zip file is one entry named after it."""
    data = Path(path).read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return {Path(path).name: data}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name) for name in z.namelist()}


def load(path: Path | None) -> str:
    """Load every entry of ``path`` into this process's compile caches; returns a one-line report."""
    if path is None:
        return "compile cache: none given (compiling from scratch)"
    if not available():
        return _missing()
    try:
        entries = read_entries(path)
    except OSError as e:
        return f"compile cache: cannot read {path}: {e} (compiling from scratch)"
    done = []
    for name, data in entries.items():
        if name == META:
            continue
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # another torch version's artifacts, a damaged file: compile instead
            done.append(f"{name}: not loaded ({type(e).__name__}: {e})")
            continue
        done.append(f"{name}: {_count(info)} artifacts" if info is not None else f"{name}: nothing usable")
    return f"compile cache {path} ({Path(path).stat().st_size / 2**20:.1f} MiB) loaded: " + "; ".join(done)


def save(path: Path, entry: str) -> str:
    """Put this process's artifacts, so far, into ``path`` as ``entry`` (replacing an entry of that
    name, keeping the others; written to a temporary file and renamed). An entry that would take
    the container past ``MAX_BYTES`` is left out, with a warning."""
    if not available():
        return _missing()
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return f"compile cache: no artifacts recorded for {entry}"
    data = result[0]
    path = Path(path)
    entries = read_entries(path) if path.exists() and zipfile.is_zipfile(path) else {}  # else: a new container
    entries[entry] = data
    entries[META] = json.dumps(environment()).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for name, blob in entries.items():
            z.writestr(name, blob)
    if buf.tell() > MAX_BYTES:
        return (f"compile cache: WARNING: with {entry} ({len(data) / 2**20:.1f} MiB raw) {path.name} would be "
                f"{buf.tell() / 2**20:.1f} MiB > {MAX_BYTES / 2**20:.0f} MiB: {entry} not saved")
    from jdm_fast.checkpoint import atomic_write  # here: `check` runs before gpu_check puts jdm_fast on the path

    atomic_write(path, lambda f: f.write(buf.getvalue()))  # a killed run never leaves a torn container
    return (f"compile cache: {entry} saved ({len(data) / 2**20:.1f} MiB raw) -> {path} "
            f"({path.stat().st_size / 2**20:.1f} MiB, entries {', '.join(n for n in entries if n != META)})")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "check":
        print("usage: python benchmarks/compile_cache.py check FILE", file=sys.stderr)
        return 2
    ok, why = matches(Path(args[1]))
    print(why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
