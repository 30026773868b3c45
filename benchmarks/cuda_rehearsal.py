"""The trainer's compiled CUDA step, rehearsed on a machine without a GPU.

    python benchmarks/cuda_rehearsal.py [--preset cifar10] [--batch 256] [--steps 3] [--out rehearsal.json]

Builds the preset's model and the trainer's own ``TrainStep`` (bf16 autocast, channels-last,
keyed draws, torch.compile with ``dynamic=False``) on fake CUDA tensors (benchmarks/fake_cuda.py)
and runs ``--steps`` training steps. Every decision a CUDA device makes is taken as on the GPU:
Triton GroupNorm+SiLU and attention through ``wrap_triton`` (our kernels appear in the graph as
``triton_kernel_wrapper_functional`` nodes, with Triton's mutation analysis run for an sm_90
target), SDPA below 128 tokens, the CUDA noise ops' fake kernels, fused AdamW. The forward goes
through Dynamo (``fullgraph=True``, ``torch._dynamo.config.error_on_recompile``), AOTAutograd's
joint forward+backward graph and its min-cut partitioner, and Inductor: joint-graph passes,
post-grad passes (including the ones that functionalize, reinplace and decompose user Triton
kernels: where the 2026-12-01 GPU run crashed), lowering, scheduling and fusion, the wrapper's and
every kernel's code generation, and the Triton compile of every kernel (Inductor's and ours, with
the specializations the graph gives them) for sm_90. It stops where a GPU is needed: loading the
compiled kernels onto the device (``CachingAutotuner._make_launchers``). The compiled graphs are
then run on the fake tensors as FX graphs, so the steps, the backward through AOTAutograd's
runtime wrappers, the optimizer and the EMA run too.

Two differences from a GPU run, both forced by having no device: Inductor's joint-graph constant
folding is off (it evaluates constants on the device), and so are AOTAutograd's donated buffers
(their check reads the C++ autograd engine's state, and the backward runs through the Python
executor of fake_cuda.py).

Prints and writes (``--out``) the phase times (Dynamo, AOTAutograd + partitioner, Inductor), the
graph counts, and per compiled graph the node count, the Triton kernels compiled and where
Inductor stopped. ``benchmarks/gpu_check --rehearse`` runs it and sizes its compile caps from it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

import fake_cuda

# Our Triton kernels (kernels/group_norm.py, kernels/attention.py): Inductor names a user kernel
# after its function.
OUR_KERNELS = ("_gn_fwd_kernel", "_gn_bwd_kernel", "_sum_over_n_kernel", "_attn_")
STOP = "loading the compiled kernels onto a GPU (CachingAutotuner._make_launchers): needs a CUDA context"


@dataclasses.dataclass
class _Compile:
    graph: str  # "forward" / "backward"
    nodes: int  # FX nodes AOTAutograd handed to Inductor
    triton_wrappers: int  # user Triton kernel calls (ours) among them
    seconds: float = 0.0
    kernel_compile_s: float = 0.0  # of which Triton compiling kernels (parallel on a GPU machine's cores)
    kernels: list = dataclasses.field(default_factory=list)  # Triton kernels compiled for sm_90
    reached: str = ""  # how far Inductor got
    error: str | None = None  # the exception that stopped it before that point, if any


class _Recorder:
    """The torch.compile backend of the rehearsal: Inductor (``compile_fx``) with an inner compile
    that runs Inductor's real ``compile_fx_inner`` up to the GPU, then hands AOTAutograd the graph
    it was given, to run on fake tensors."""

    def __init__(self):
        self.compiles: list[_Compile] = []
        self.dynamo_graphs: list[dict] = []
        self.backend_s = 0.0
        self.first_backend_at: float | None = None

    def backend(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        if self.first_backend_at is None:
            self.first_backend_at = time.perf_counter()
        ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        self.dynamo_graphs.append({"nodes": len(gm.graph.nodes),
                                   "custom_ops": sorted({o for o in ops if o.startswith("jdm_fast.")}),
                                   "sdpa": any("scaled_dot_product_attention" in o for o in ops)})
        t0 = time.perf_counter()
        try:
            return compile_fx(gm, example_inputs, inner_compile=self.inner,
                              config_patches={"joint_graph_constant_folding": False})
        finally:
            self.backend_s += time.perf_counter() - t0

    def inner(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        from torch._functorch.aot_autograd import make_boxed_func
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner

        runnable = copy.deepcopy(gm)  # what AOTAutograd handed over, before Inductor's passes mutate gm
        record = _Compile(graph="backward" if kwargs.get("is_backward") else "forward", nodes=len(gm.graph.nodes),
                          triton_wrappers=sum("triton_kernel_wrapper" in str(n.target) for n in gm.graph.nodes))
        self.compiles.append(record)

        def make_launchers(autotuner):  # every config of the kernel is compiled by now
            record.kernels.append(autotuner.fn.__name__)

        precompile = CachingAutotuner.precompile

        def timed_precompile(autotuner, *args, **kw):
            t = time.perf_counter()
            try:
                return precompile(autotuner, *args, **kw)
            finally:
                record.kernel_compile_s += time.perf_counter() - t

        t0 = time.perf_counter()
        try:
            with mock.patch.object(CachingAutotuner, "_make_launchers", make_launchers), \
                    mock.patch.object(CachingAutotuner, "precompile", timed_precompile):
                compile_fx_inner(gm, example_inputs, **kwargs)
            record.reached = "generated and compiled every kernel for sm_90; stopped before " + STOP
        except Exception as e:  # noqa: BLE001 - reported: where Inductor stopped is the result
            frames = traceback.extract_tb(e.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)
                          if "torch/_inductor" in f.filename), "?")
            record.error = f"{type(e).__name__} at {where}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            record.reached = "stopped early"
        record.seconds = time.perf_counter() - t0
        return make_boxed_func(runnable.forward)


def _existing(config, **settings) -> dict:
    """The settings this torch's config module has (older versions lack some; their defaults
    there are what the setting asks for: a backward compiled at once, no donated buffers)."""
    return {k: v for k, v in settings.items() if hasattr(config, k)}


def _fake_batch(preset: str, batch: int, mode):
    import train_bench as tb

    x, y = tb.synthetic_batch(preset, batch, torch.device("cpu"))  # the shapes and dtypes gpu_check times
    x = x.contiguous(memory_format=torch.channels_last)
    return fake_cuda.fake_cuda_like(x, mode), fake_cuda.fake_cuda_like(y, mode)


def supported() -> str | None:
    """None where this torch can trace fake CUDA tensors without a CUDA driver, else why not."""
    if not hasattr(torch._C, "_ensureCUDADeviceGuardSet"):
        return (f"torch {torch.__version__} initialises the CUDA device for fake CUDA tensors (no "
                "torch._C._ensureCUDADeviceGuardSet): the rehearsal needs a newer torch (2.11, 2.14 checked)")
    return fake_cuda.missing_triton()


def rehearse(preset: str = "cifar10", batch: int = 256, steps: int = 3) -> dict:
    """Run ``steps`` compiled training steps of ``preset`` on fake CUDA tensors; return the report
    (see the module docstring). Raises what Dynamo raises (a graph break under fullgraph, a
    recompile under error_on_recompile)."""
    from torch._dynamo.utils import counters

    from jdm_fast.training.config import get_preset
    from jdm_fast.training.loop import build_model
    from jdm_fast.training.precision import Precision
    from jdm_fast.training.step import TrainStep

    cfg = get_preset(preset)
    torch.manual_seed(0)
    # channels-last before the weights become fake (TrainStep leaves a channels-last model as it is:
    # nn.Module.to cannot swap fake parameters)
    model = build_model(cfg, torch.device("cpu")).to(memory_format=torch.channels_last)
    recorder = _Recorder()
    torch._dynamo.reset()
    counters.clear()
    step_s = []
    t_start = time.perf_counter()
    with fake_cuda.fake_cuda() as mode, torch._dynamo.config.patch(error_on_recompile=True), \
            torch._inductor.config.patch(compile_threads=1, force_disable_caches=True), \
            torch._functorch.config.patch(_existing(torch._functorch.config, force_non_lazy_backward_lowering=True,
                                                    donated_buffer=False)):
        fake_cuda.to_fake_cuda(model, mode)
        precision = Precision(torch.bfloat16, False, "bf16 autocast (rehearsal)")
        trainer = TrainStep.from_config(cfg, model, precision, compile=True, channels_last=True,
                                        compile_backend=recorder.backend, fullgraph=True)
        x, y = _fake_batch(preset, batch, mode)
        for i in range(steps):
            t0 = time.perf_counter()
            out = trainer(x, y, i)
            step_s.append(time.perf_counter() - t0)
        loss = out.losses[0]
        params = [p for p in model.parameters() if p.requires_grad]
        stepped = sum(len(trainer.optimizer.state.get(p, {})) > 0 for p in params)  # got a gradient, took a step
        cleared = all(p.grad is None for p in params)  # zero_grad(set_to_none) after the step
        ema_device = next(trainer.ema.model.parameters()).device if trainer.ema else None
    total_s = time.perf_counter() - t_start
    first_call_s = step_s[0]
    inductor_s = sum(c.seconds for c in recorder.compiles)
    kernel_compile_s = sum(c.kernel_compile_s for c in recorder.compiles)
    dynamo_s = (recorder.first_backend_at or t_start) - t_start  # to the backend's first call (model set-up included)
    report = {
        "preset": preset, "batch": batch, "steps": steps, "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
        "recompiles": counters["stats"]["unique_graphs"] - len(recorder.dynamo_graphs),
        "dynamo_graphs": recorder.dynamo_graphs,
        "dynamo_s": dynamo_s, "aot_s": recorder.backend_s - inductor_s, "inductor_s": inductor_s,
        "kernel_compile_s": kernel_compile_s, "kernels": sum(len(c.kernels) for c in recorder.compiles),
        "first_step_s": first_call_s, "later_steps_s": step_s[1:], "total_s": total_s,
        "compiles": [dataclasses.asdict(c) for c in recorder.compiles],
        "loss": {"device": str(loss.device), "dtype": str(loss.dtype), "shape": list(loss.shape)},
        "scaler_enabled": trainer.scaler.is_enabled(), "params": len(params), "params_stepped": stepped, "grads_cleared": cleared, "ema_device": str(ema_device),
        "stops_at": STOP,
    }
    return report


def summary(report: dict) -> str:
    lines = [f"CUDA step rehearsal: {report['preset']} batch {report['batch']}, {report['steps']} steps, torch "
             f"{report['torch']}, triton {report['triton']}",
             f"  graphs {report['graphs']}, graph breaks {report['graph_breaks']}, recompiles {report['recompiles']}; "
             f"custom ops in the graph: {', '.join(report['dynamo_graphs'][0]['custom_ops']) if report['dynamo_graphs'] else '-'}",
             f"  Dynamo (with model set-up) {report['dynamo_s']:.1f} s | AOTAutograd + partitioner {report['aot_s']:.1f} s | "
             f"Inductor {report['inductor_s']:.1f} s (of which Triton compiling {report['kernels']} kernels "
             f"{report['kernel_compile_s']:.1f} s) | first step {report['first_step_s']:.1f} s, total "
             f"{report['total_s']:.1f} s"]
    for c in report["compiles"]:
        ours = sum(k.startswith(OUR_KERNELS) for k in c["kernels"])
        lines.append(f"  {c['graph']}: {c['nodes']} nodes ({c['triton_wrappers']} of our Triton kernel calls), "
                     f"{len(c['kernels'])} Triton kernels compiled for sm_90 ({ours} ours) in {c['seconds']:.1f} s; "
                     f"{c['reached']}" + (f": {c['error']}" if c["error"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    why_not = supported()
    if why_not:
        print(f"cuda_rehearsal: cannot run here: {why_not}", file=sys.stderr)
        return 2
    report = rehearse(args.preset, args.batch, args.steps)
    print(summary(report), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    ok = (report["graphs"], report["graph_breaks"], report["recompiles"]) == (1, 0, 0) and all(
        c["error"] is None for c in report["compiles"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
