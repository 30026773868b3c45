"""benchmarks/report.py renders pytest-benchmark and train_throughput JSON as markdown."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import report  # noqa: E402


def _bench(name, group, mean, **extra):
    return {"group": group, "name": name, "fullname": f"benchmarks/test_x.py::{name}",
            "param": name.split("[")[1].rstrip("]") if "[" in name else None,
            "stats": {"mean": mean, "min": mean, "max": mean, "rounds": 3}, "extra_info": extra}


SYNTHETIC = {
    "machine_info": {"node": "box", "processor": "x86_64", "system": "Linux", "release": "6.1",
                     "python_version": "3.11.7", "cpu": {"brand_raw": "AMD EPYC"}},
    "datetime": "2026-11-29T03:00:00", "version": "5.2.3",
    "benchmarks": [
        _bench("test_train_step_cpu[baseline_fp32]", None, 0.2, device="cpu", torch="2.14.1", triton="3.8.0",
               **{"images/s": 80.0, "ratio_vs_baseline_fp32": 1.0, "peak_mem_mb": None}),
        _bench("test_train_step_cpu[engine]", None, 0.1, device="cpu", **{"images/s": 160.0,
                                                                          "ratio_vs_baseline_fp32": 2.0}),
        _bench("test_gn[256x128]", "norm", 0.001, device="NVIDIA H200", **{"GB/s": 3000.5, "speedup_vs_eager": 2.5}),
    ],
}


def test_report_groups_metrics_ratios_and_header(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(SYNTHETIC))
    out = tmp_path / "BENCH.md"
    assert report.main([str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert "2026-11-29T03:00:00" in text and "AMD EPYC" in text and "torch 2.14.1, triton 3.8.0" in text
    assert "### test_train_step_cpu" in text and "### norm" in text
    train = text.split("### test_train_step_cpu")[1].split("###")[0]
    assert "| case | mean ms | images/s | ratio vs baseline fp32 | device |" in train
    assert "| engine | 100 | 160 | 2.00 | cpu |" in train
    norm = text.split("### norm")[1]
    assert "GB/s" in norm and "3,000" in norm and "speedup vs eager" in norm and "NVIDIA H200" in norm


def test_report_renders_train_throughput_json(tmp_path, capsys):
    data = {"datetime": "2026-11-29", "device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "preset": "cifar10",
            "batch": 256, "steps": 200, "warmup": 10, "GFLOP/image": 36.0, "goal": ["goal 5,000 images/s: (met)"],
            "variants": [{"variant": "engine", "precision": "bf16", "compile": True, "images/s": 6000.0,
                          "ms/step": 42.7, "peak_mem_mb": 20000.0, "ratio_vs_baseline_fp32": 3.0}]}
    src = tmp_path / "train.json"
    src.write_text(json.dumps(data))
    assert report.main([str(src)]) == 0
    text = capsys.readouterr().out
    assert "| engine | bf16 | yes | 6,000 | 42.7 | 20,000 |" in text and "- goal 5,000 images/s: (met)" in text


def test_report_rejects_unknown_json(tmp_path):
    src = tmp_path / "x.json"
    src.write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        report.main([str(src)])
