"""benchmarks/profile_digest.py: kernel names fall into the right categories, per-step times,
idle gaps between kernels and the top kernels of a synthetic chrome trace; the gzipped trace
stays under its size limit; a real (CPU) profile of a few steps gives a digest and a trace."""
import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_digest as pd  # noqa: E402

NAMES = {
    # cuDNN / CUTLASS convolutions (forward, data and weight gradients), cuBLAS GEMMs
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
    "sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_64x64_64x4_nhwc_align8>": "convolution",
    "void implicit_convolve_sgemm<float, float, 128, 5, 5>(int, int)": "convolution",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
    "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x3_tn": "matmul",
    "triton_tem_fused_mm_0": "matmul",
    "triton_tem_fused_convolution_3": "convolution",
    # GroupNorm: Inductor's fusions, ours, ATen's
    "triton_red_fused_native_group_norm_silu_4": "GroupNorm",
    "triton_per_fused_native_group_norm_backward_12": "GroupNorm",
    "_gn_fwd_kernel": "GroupNorm",
    "_gn_bwd_kernel": "GroupNorm",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*, float*)": "GroupNorm",
    # attention: SDPA's backends, ours
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>(Flash_fwd_params)": "attention",
    "void pytorch_flash::flash_bwd_convert_dq_kernel<Flash_bwd_kernel_traits<64>>(Flash_bwd_params)": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
    "_attn_fwd_kernel": "attention",
    "_attn_bwd_dkdv_kernel": "attention",
    # optimizer, gradient clipping, scaler, EMA
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer + EMA",
    "void at::native::_amp_foreach_non_finite_check_and_unscale_cuda_kernel<float>": "optimizer + EMA",
    "void at::native::lerp_kernel_scalar<float>": "optimizer + EMA",
    # copies and layout changes
    "Memcpy DtoD (Device -> Device)": "copies",
    "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda(at::TensorIteratorBase&)>": "copies",
    "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>": "copies",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 4>": "copies",
    "triton_poi_fused__to_copy_0": "copies",
    "triton_poi_fused_clone_permute_7": "copies",
    # everything else elementwise / reductions
    "triton_poi_fused__to_copy_add_mul_silu_5": "other elementwise",
    "triton_poi_fused_convolution_2": "other elementwise",
    "triton_red_fused_mean_sum_9": "other elementwise",
    "void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps<float, float>>>": "other elementwise",
    "void at::native::vectorized_elementwise_kernel<4, silu_kernel_cuda>": "other elementwise",
    "philox_q_sample_kernel": "other elementwise",
}


@pytest.mark.parametrize("name,category", list(NAMES.items()), ids=[n[:40] for n in NAMES])
def test_categorize_kernel_names(name, category):
    assert pd.categorize(name) == category
    assert category in pd.CATEGORIES


def test_memcpy_and_memset_events_are_copies_whatever_their_name():
    assert pd.categorize("Memset (Device)", "gpu_memset") == "copies"
    assert pd.categorize("anything", "gpu_memcpy") == "copies"


def _kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur}


def test_busy_union_and_span_with_overlaps_and_gaps():
    events = [_kernel("a", 0, 10), _kernel("b", 5, 10), _kernel("c", 30, 5), _kernel("d", 31, 2), _kernel("e", 50, 10)]
    busy, span = pd.busy_and_span_us(events)
    assert (busy, span) == (15 + 5 + 10, 60)
    assert pd.busy_and_span_us([]) == (0.0, 0.0)


def test_digest_per_step_categories_idle_and_top_kernels():
    """Two steps of 100 us: conv 30+30, GroupNorm 10+10, a copy 5+5, an optimizer kernel 15+15;
    gaps of 40 us per step (with a CPU event and a flow event that must be ignored)."""
    events = [{"ph": "M", "name": "process_name", "pid": 0}, {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d",
                                                               "ts": 0, "dur": 500}]
    for s in range(2):
        t = 100 * s
        events += [_kernel("sm90_xmma_fprop_implicit_gemm_bf16", t + 0, 30), _kernel("_gn_fwd_kernel", t + 40, 10),
                   _kernel("Memcpy HtoD (Pageable -> Device)", t + 55, 5, cat="gpu_memcpy"),
                   _kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", t + 70, 15),
                   {"ph": "s", "cat": "ac2g", "name": "flow", "ts": t, "id": s}]
    d = pd.digest(events, steps=2, top=3)
    assert d["kind"] == "profile_digest" and d["gpu_events"] == 8 and d["distinct_kernels"] == 4
    assert d["span_ms/step"] == pytest.approx(0.185 / 2)  # 0 .. 185 us
    assert d["busy_ms/step"] == pytest.approx(0.060)  # 60 us of kernels per step
    assert d["idle_ms/step"] == pytest.approx((0.185 - 0.120) / 2)
    cats = {c["category"]: c["ms/step"] for c in d["categories"]}
    assert cats["convolution"] == pytest.approx(0.030) and cats["GroupNorm"] == pytest.approx(0.010)
    assert cats["copies"] == pytest.approx(0.005) and cats["optimizer + EMA"] == pytest.approx(0.015)
    assert cats["attention"] == 0 and cats[pd.IDLE] == pytest.approx(d["idle_ms/step"])
    assert set(cats) == set(pd.CATEGORIES) | {pd.IDLE}
    assert sum(c["fraction"] for c in d["categories"]) == pytest.approx(1.0)  # categories + idle = the span
    assert [k["category"] for k in d["kernels"]] == ["convolution", "optimizer + EMA", "GroupNorm"]
    assert d["kernels"][0]["calls/step"] == 1 and d["kernels"][0]["ms/step"] == pytest.approx(0.030)
    assert d["kernels"][0]["fraction_of_busy"] == pytest.approx(0.5)


def test_digest_of_a_trace_without_gpu_events():
    d = pd.digest([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}], steps=3)
    assert d["gpu_events"] == 0 and d["kernels"] == [] and d["span_ms/step"] == 0
    assert all(c["fraction"] is None for c in d["categories"])


def test_write_trace_drops_cpu_events_past_the_limit(tmp_path):
    cpu = [{"ph": "X", "cat": "cpu_op", "name": f"aten::op{i}", "ts": i, "dur": 1, "args": {"x": str(i) * 20}}
           for i in range(20000)]
    gpu = [_kernel(f"triton_poi_fused_add_{i}", i, 1) for i in range(200)]
    trace = {"traceEvents": [{"ph": "M", "name": "process_name"}] + cpu + gpu}
    path = tmp_path / "t.json.gz"
    assert pd.write_trace(trace, path, max_bytes=50_000) == "GPU events only (CPU side dropped: size)"
    kept = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    assert len(kept) == 201 and path.stat().st_size <= 50_000
    assert pd.write_trace(trace, path) == "full trace"
    assert pd.load_trace(path) == trace


def test_record_profiles_steps_on_cpu_and_the_cli_redigests_the_trace(tmp_path, capsys):
    lin = torch.nn.Linear(8, 8)

    def step(x, y):
        loss = (lin(x) - y).square().mean()
        loss.backward()
        return loss

    x, y = torch.randn(4, 8), torch.randn(4, 8)
    d = pd.record(step, x, y, 3, torch.device("cpu"), tmp_path / "trace.json.gz")
    assert d["steps"] == 3 and d["gpu_events"] == 0 and "no GPU kernels" in d["note"]
    assert (tmp_path / "trace.json.gz").stat().st_size > 0 and d["trace"] == "trace.json.gz"
    names = {e.get("name") for e in pd.load_trace(tmp_path / "trace.json.gz")["traceEvents"]}
    assert "aten::addmm" in names or "aten::linear" in names
    assert pd.main([str(tmp_path / "trace.json.gz"), "--steps", "3", "--out", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["kind"] == "profile_digest"
