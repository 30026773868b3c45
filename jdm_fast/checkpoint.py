"""Crash-safe checkpoints.

A checkpoint is written to a temporary file in the run folder, fsync'd and verified, then
rotated in by renames: the current ``checkpoint.pt`` becomes ``checkpoint.prev.pt`` (through a hard
link, so ``checkpoint.pt`` never disappears) and the new file is renamed over ``checkpoint.pt``.
At every instant the disk holds a complete latest checkpoint and, after the second save, the
previous one; never only a half-written one.

Loading verifies the file before unpickling it: ``torch.save`` writes a zip archive with a CRC-32
per record, which ``torch.load`` does not check (a flipped byte in a tensor loads silently), so
:func:`verify_checkpoint` checks every record with :mod:`zipfile`. :func:`load_latest` falls back
to ``checkpoint.prev.pt`` when ``checkpoint.pt`` is missing, truncated or corrupt, and says so,
naming the file.

Files are data, never code: every load is ``torch.load(weights_only=True)`` (tensors, containers,
numbers, strings, torch dtypes) with one allow-listed addition, the NumPy array reconstruction
that the NumPy RNG state of older checkpoints needs (new ones store it as plain lists). A file that
asks for anything else (a pickled callable, say) is refused with :class:`UnsafeFileError` naming
the file and the global it asked for; nothing in it runs.

A write that the operating system refuses (no space, no permission, a read-only file system)
raises :class:`StorageError`, one line naming the path, the reason and, for a full disk, the bytes
needed and free; the temp file is removed and the checkpoints already on disk are untouched.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (truncated, corrupt, or not ours)."""


class UnsafeFileError(CheckpointError):
    """The file asks to load Python objects outside the allow-list: refused, nothing run."""


class StorageError(OSError):
    """The operating system refused a write (full disk, no permission, read-only file system);
    ``str()`` is one line naming the path and what to do."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "storage error"


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free
            return None
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def storage_error(e: OSError, path: Path, action: str = "writing", needed: int | None = None) -> StorageError:
    """A :class:`StorageError` for ``e`` (raised while ``action`` ``path``): one line, the reason first."""
    path = Path(path)
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path.parent)
        need = f"needs about {_mb(needed)}, " if needed else ""
        have = f"{_mb(free)} free" if free is not None else "free space unknown"
        msg = (f"no space left on the device {action} {path} ({need}{have}); the checkpoints already in "
               f"{path.parent} are intact. Free space, or resume with --out on another disk after copying the run folder")
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"permission denied {action} {path}: make the folder writable for this user, or choose another --out"
    elif code == errno.EROFS:
        msg = f"read-only file system {action} {path}: choose an --out on a writable file system"
    else:
        msg = f"{e.strerror or e} {action} {path}"
    err = StorageError(msg)
    err.errno, err.strerror, err.filename = code, e.strerror, str(path)
    return err


def _numpy_globals() -> list:
    """What a pickled NumPy array needs (the NumPy RNG state of checkpoints before 2026-12)."""
    out = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(__import__(mod, fromlist=["_reconstruct"]), "_reconstruct"))
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "uint8")]
    return out


def safe_load(path, what: str = "file"):
    """``torch.load(path, weights_only=True)`` (+ NumPy arrays) onto the CPU; anything else in the file
    raises :class:`UnsafeFileError` naming ``what``, the path and the refused global."""
    with torch.serialization.safe_globals(_numpy_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = str(e)
            found = re.search(r"(?:Unsupported global|GLOBAL)\W+([\w.]+)", msg)
            name = found.group(1) if found else "an object outside the allow-list"
            raise UnsafeFileError(
                f"{what} {path} asks to load {name}, which a {what} never holds: refusing it (files are loaded "
                "as data only; nothing in it was run)") from e


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem lets a folder be fsync'd
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files a killed process left behind (``.<name>.*.tmp``); returns them."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale


def atomic_write(path: Path, write, verify=None, before_replace=None, size_hint: int | None = None) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync it, run ``verify(temp_path)``
    and then ``before_replace()`` if given, then rename it to ``path``. On any error the temp file is
    removed and ``path`` is untouched; an error of the operating system (full disk, permissions)
    becomes a :class:`StorageError` (``size_hint``: the bytes the file needs, for its message)."""
    path = Path(path)
    try:
        fd, tmp = _temp_name(path)
    except OSError as e:
        raise storage_error(e, path, "creating a temp file for", size_hint) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, StorageError) and e.errno is not None:
            raise storage_error(e, path, "writing", size_hint) from e
        raise


def state_bytes(state) -> int:
    """The bytes of the tensors (and NumPy arrays) in a nested state: about what ``torch.save`` writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, np.ndarray):
        return state.nbytes
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _torch_save(state: dict, f) -> None:
    if torch.serialization.get_crc32_options():
        torch.save(state, f)
        return
    torch.serialization.set_crc32_options(True)  # verification needs the per-record CRCs
    try:
        torch.save(state, f)
    finally:
        torch.serialization.set_crc32_options(False)


def save_checkpoint(path: Path, state: dict, keep_previous: bool = True) -> None:
    """Write ``state`` atomically to ``path`` (verified from the page cache before the rename: cheap,
    and catches a bad write such as a full disk); with ``keep_previous`` the checkpoint it replaces
    becomes ``<folder>/checkpoint.prev.pt`` first."""
    path = Path(path)
    previous = path.with_name(PREVIOUS_NAME)

    def keep_old() -> None:
        if not (keep_previous and path.exists()):
            return
        link = previous.with_name(f".{previous.name}.link.tmp")
        with contextlib.suppress(FileNotFoundError):
            link.unlink()  # left by a process killed right here
        try:  # link + rename: `path` stays in place while `previous` becomes a second name for it
            os.link(path, link)
            os.replace(link, previous)
        except OSError:  # no hard links on this filesystem: a plain rename (`previous` is complete)
            with contextlib.suppress(OSError):
                link.unlink()
            os.replace(path, previous)

    atomic_write(path, lambda f: _torch_save(state, f), verify_checkpoint, keep_old, size_hint=state_bytes(state))


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless every record of the archive is intact."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: record {bad!r} fails its CRC-32 check")


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint; a missing file raises FileNotFoundError, a truncated or corrupt one
    :class:`CheckpointError` (a RuntimeError) naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    verify_checkpoint(path)
    try:
        state = safe_load(path, "checkpoint")
    except UnsafeFileError:
        raise
    except Exception as e:  # torch raises several types for corrupt archives
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} does not hold a jdm_fast training state")
    return state


def check_weights(state: dict, expected: dict, source: str) -> None:
    """Refuse weights that do not fit the model they are loaded into, before loading them: a
    missing or unexpected key, a tensor of another shape, a non-floating tensor where the model
    holds a floating one (an int32 export would be cast and load as garbage), a NaN or Inf in a
    floating tensor. ``expected`` is the model's ``state_dict()``; the error is one line naming
    ``source`` (the file, and which weights in it) and the first offending key, in the model's order."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = (f"no tensor {missing[0]!r} (and {len(missing) - 1} more missing)" if missing else
                f"an unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)")
        raise CheckpointError(f"{source} does not match the model its config describes: {what}")
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{source}: {key!r} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{source} does not match the model its config describes: {key!r} has shape "
                                  f"{tuple(got.shape)}, the model's is {tuple(want.shape)}")
        if want.is_floating_point() and not got.is_floating_point():
            raise CheckpointError(f"{source}: {key!r} is {got.dtype}, not floating point (the model's is {want.dtype})")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise CheckpointError(f"{source}: {key!r} holds {bad} non-finite value(s) (NaN or Inf) of {got.numel()}")


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints of a run folder that exist, newest first."""
    return [p for p in (Path(folder) / CHECKPOINT_NAME, Path(folder) / PREVIOUS_NAME) if p.is_file()]


def load_latest(folder: Path, log=print) -> tuple[dict, Path]:
    """The newest usable checkpoint of ``folder`` and its path: ``checkpoint.pt``, or, when that is
    missing, truncated or corrupt, ``checkpoint.prev.pt`` (with a message naming the bad file)."""
    files = checkpoint_files(folder)
    if not files:
        raise FileNotFoundError(f"no checkpoint in {folder} (expected {Path(folder) / CHECKPOINT_NAME})")
    errors = []
    for i, path in enumerate(files):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            if i + 1 < len(files):
                log(f"warning: {e}; falling back to the previous checkpoint {files[i + 1]}")
            continue
        return state, path
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors))


def rng_state(device: torch.device | None = None) -> dict:
    """Every global random state the training loop uses (CUDA: the training device's only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]  # plain data (weights_only)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and device is not None and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
            cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
