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


def test_report_renders_windows_ratios_compile_time_and_gpu_state(tmp_path, capsys):
    data = {"datetime": "2026-12-06", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
            "preset": "cifar10", "batch": 256, "steps": 10, "windows": 3, "warmup": 3, "GFLOP/image": 65.5,
            "goal": ["goal >= 1.3x baseline_strong: 1.40x (met)"],
            "variants": [
                {"variant": "baseline_strong", "precision": "bf16", "compile": True, "images/s": 3000.0,
                 "images/s_min": 2990.0, "images/s_max": 3010.0, "ms/step": 85.3, "peak_mem_mb": 9000.0,
                 "warmup_s": 41.0, "gpu_start": {"sm_clock_mhz": 1980.0, "temperature_c": 35.0},
                 "gpu_end": {"sm_clock_mhz": 1755.0, "temperature_c": 52.0}},
                {"variant": "engine", "precision": "bf16", "compile": True, "images/s": 4200.0,
                 "images/s_min": 4100.0, "images/s_max": 4250.0, "ms/step": 61.0, "peak_mem_mb": 7000.0,
                 "ratio_vs_baseline_strong": 1.4, "ratio_vs_baseline_amp_compile": 2.1, "warmup_s": 63.0,
                 "graphs": 1, "graph_breaks": 0, "gpu_start": {"sm_clock_mhz": 1980.0, "temperature_c": 40.0},
                 "gpu_end": {"sm_clock_mhz": None, "temperature_c": None}}]}
    src = tmp_path / "train.json"
    src.write_text(json.dumps(data))
    assert report.main([str(src)]) == 0
    text = capsys.readouterr().out
    assert "3 windows of 10 timed steps (images/s: the median window's)" in text
    assert ("| variant | precision | compile | images/s | ms/step | peak mem MiB | images/s min | images/s max | "
            "ratio vs baseline strong | ratio vs baseline amp compile | warm-up s (compile) | graphs | graph breaks | "
            "SM MHz | temp C |") in text
    assert "| engine | bf16 | yes | 4,200 | 61.0 | 7,000 | 4,100 | 4,250 | 1.40 | 2.10 | 63.0 | 1 | 0 | 1,980 -> - |" in text
    assert "| baseline_strong | bf16 | yes | 3,000 | 85.3 | 9,000 | 2,990 | 3,010 | - | - | 41.0 | - | - | " \
           "1,980 -> 1,755 | 35.0 -> 52.0 |" in text


DIGEST = {"kind": "profile_digest", "variant": "engine", "device": "NVIDIA H100", "torch": "2.11", "triton": "3.6",
          "preset": "cifar10", "batch": 256, "steps": 3, "trace": "trace_engine.json.gz", "trace_kept": "full trace",
          "span_ms/step": 60.0, "busy_ms/step": 55.0, "idle_ms/step": 5.0, "gpu_events": 6000, "distinct_kernels": 240,
          "categories": [{"category": "convolution", "ms/step": 30.0, "fraction": 0.5},
                         {"category": "idle gaps", "ms/step": 5.0, "fraction": 5 / 60}],
          "kernels": [{"name": f"kernel_{i}_" + "x" * 100, "category": "convolution", "calls/step": 2.0,
                       "ms/step": 10.0 - i, "fraction_of_busy": (10.0 - i) / 55} for i in range(8)]}


def test_report_renders_a_profile_digest_in_full_and_brief(tmp_path, capsys):
    src = tmp_path / "profile_engine.json"
    src.write_text(json.dumps(DIGEST))
    out = tmp_path / "B.md"
    assert report.main([str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## profile of engine (profile_engine.json)" in text
    assert "GPU span 60.0 ms, kernels busy 55.0 ms, idle gaps 5.00 ms" in text
    assert "| convolution | 30.0 | 0.5 |" in text and "| idle gaps | 5.00 | 0.0833 |" in text
    assert "| 8 | kernel_7_" in text and "..." in text  # every kernel, long names shortened
    assert report.main([str(src), "--brief"]) == 0
    brief = capsys.readouterr().out
    assert "| 5 | kernel_4_" in brief and "| 6 | kernel_5_" not in brief
    cpu = dict(DIGEST, gpu_events=0, kernels=[], note="no GPU kernels in the trace (a CPU run)")
    text = report.render(cpu, "profile_engine.json")
    assert "- no GPU kernels in the trace (a CPU run)" in text and "| category |" not in text
