"""benchmarks/compile_cache.py: one zip container of per-process entries of
torch.compiler.save_cache_artifacts() bytes, loaded entry by entry with load_cache_artifacts;
raw bytes load as one entry; a missing API, an unreadable file or bytes of another torch never
stop a run; an entry past the size limit is left out; the container says what it was made with,
and ``check`` tells whether that is this machine. torch's functions are replaced by fakes here
(a real Inductor compile takes a minute on 2 cores; gpu_check --rehearse saves and loads real ones)."""
import json
import random
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compile_cache  # noqa: E402


@pytest.fixture
def fake_torch(monkeypatch):
    state = {"recorded": b"artifacts-of-this-process", "loaded": []}

    def save():
        data = state["recorded"]
        return None if data is None else (data, SimpleNamespace(artifacts={"inductor": ["k1", "k2"]}))

    def load(data):
        if data.startswith(b"bad"):
            raise RuntimeError("unpickling failed")
        state["loaded"].append(data)
        return SimpleNamespace(artifacts={"inductor": ["k1"], "aot_autograd": ["a1"]})

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", save, raising=False)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load, raising=False)
    return state


def test_the_installed_torch_has_the_apis():
    assert compile_cache.available()  # torch >= 2.7 (the declared floor)


def test_save_adds_and_replaces_entries_and_load_reads_them_all(tmp_path, fake_torch):
    path = tmp_path / "compile_cache.bin"
    assert "engine saved" in compile_cache.save(path, "engine")
    fake_torch["recorded"] = b"baseline artifacts"
    compile_cache.save(path, "baseline_strong")
    fake_torch["recorded"] = b"engine artifacts, second run"
    compile_cache.save(path, "engine")
    assert zipfile.is_zipfile(path) and not path.with_name(path.name + ".tmp").exists()
    entries = compile_cache.read_entries(path)
    assert json.loads(entries.pop(compile_cache.META)) == compile_cache.environment()
    assert entries == {"engine": b"engine artifacts, second run", "baseline_strong": b"baseline artifacts"}
    report = compile_cache.load(path)
    assert "engine: 2 artifacts" in report and "baseline_strong: 2 artifacts" in report
    assert sorted(fake_torch["loaded"]) == [b"baseline artifacts", b"engine artifacts, second run"]


def test_raw_bytes_load_as_one_entry_and_a_raw_output_becomes_a_container(tmp_path, fake_torch):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"raw artifact bytes")
    assert compile_cache.read_entries(raw) == {"raw.bin": b"raw artifact bytes"}
    assert "raw.bin: 2 artifacts" in compile_cache.load(raw)
    compile_cache.save(raw, "engine")
    assert set(compile_cache.read_entries(raw)) == {"engine", compile_cache.META}


def test_nothing_stops_a_run(tmp_path, fake_torch, monkeypatch):
    assert "none given" in compile_cache.load(None)
    assert "cannot read" in compile_cache.load(tmp_path / "missing.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"bad bytes of another torch")
    assert "not loaded (RuntimeError: unpickling failed)" in compile_cache.load(bad)
    fake_torch["recorded"] = None
    assert "no artifacts recorded" in compile_cache.save(tmp_path / "c.bin", "engine")
    assert not (tmp_path / "c.bin").exists()
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts")
    assert not compile_cache.available()
    assert "no torch.compiler.save_cache_artifacts" in compile_cache.load(bad)
    assert "no torch.compiler.save_cache_artifacts" in compile_cache.save(tmp_path / "c.bin", "engine")


def test_an_entry_past_the_size_limit_is_left_out(tmp_path, fake_torch, monkeypatch):
    path = tmp_path / "compile_cache.bin"
    compile_cache.save(path, "engine")
    monkeypatch.setattr(compile_cache, "MAX_BYTES", 4000)
    fake_torch["recorded"] = random.Random(0).randbytes(10_000)  # deflate does not shrink random bytes
    assert "WARNING" in compile_cache.save(path, "baseline_strong")
    assert set(compile_cache.read_entries(path)) == {"engine", compile_cache.META}


def test_check_tells_whether_a_cache_was_made_here(tmp_path, fake_torch, capsys):
    path = tmp_path / "compile_cache.bin"
    compile_cache.save(path, "engine")
    assert compile_cache.matches(path)[0] and compile_cache.main(["check", str(path)]) == 0
    assert "matches this machine" in capsys.readouterr().out
    elsewhere = dict(compile_cache.environment(), device="NVIDIA H200", torch="2.11.0+cu130")
    entries = compile_cache.read_entries(path)
    entries[compile_cache.META] = json.dumps(elsewhere).encode()
    with zipfile.ZipFile(path, "w") as z:  # the same container, made on another machine
        for name, blob in entries.items():
            z.writestr(name, blob)
    ok, why = compile_cache.matches(path)
    assert not ok and "device NVIDIA H200 (here " in why and "torch 2.11.0+cu130 (here " in why
    assert compile_cache.main(["check", str(path)]) == 1
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"raw artifacts")
    assert compile_cache.matches(raw) == (True, f"{raw}: no _meta.json (raw artifacts): assumed to match this machine")
    assert not compile_cache.matches(tmp_path / "missing.bin")[0]
    assert compile_cache.main(["frobnicate"]) == 2
