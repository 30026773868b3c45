"""A CUDA device for torch.compile on a machine without one: enough to trace, partition, lower and
generate code for a CUDA graph, never to run it (benchmarks/cuda_rehearsal.py uses it).

``fake_cuda()`` is a context manager that makes five things true while it is open:

1. ``FakeTensorMode``: tensors on ``device="cuda"`` are fake (shapes, dtypes, strides, no data);
   ``to_fake_cuda(module, mode)`` turns a module's parameters and buffers into such tensors.
2. Triton sees an active driver whose target is sm_90 (``StubTritonDriver``), so what needs a
   target without running anything (the kernel mutation analysis of ``wrap_triton``, which
   generates TTIR; Inductor's compiles of its own and our kernels) runs as on a Hopper GPU.
   Launching anything stays impossible.
3. Autocast, the GradScaler and Inductor see a bf16-capable device with an H100's properties
   (``pretend_sm90``): 132 SMs, compute capability 9.0, 227 KiB shared memory per block (opt-in),
   so bf16 autocast stays on and Inductor's lowering and kernel heuristics decide as they do on
   the GPU machine.
4. ``copy.deepcopy`` copies fake tensors as fake tensors (the trainer's EMA copies the model).
5. Reverse-mode autodiff runs through ``grad`` / ``backward`` below, a Python executor over the
   autograd graph, instead of the C++ engine. The engine cannot run a graph of fake CUDA tensors
   on a machine without a CUDA driver: its stream bookkeeping (``GraphTask::stash_current_streams``)
   asks the driver for a primary context and fails with "hasPrimaryContext expects a valid device
   index" (torch 2.11-2.14). AOTAutograd traces the joint forward+backward graph by calling
   ``torch.autograd.grad`` on fake tensors, so it goes through the executor here; it calls the
   same backward formulas (C++ nodes directly, custom autograd Functions through their
   ``backward``) in a topological order, with the engine's shape and dtype fix-ups.

Nothing here is used by the package: it is a test and rehearsal harness.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Sequence
from unittest import mock

import torch
from torch.autograd.function import BackwardCFunction
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

# What Inductor reads of a CUDA device (torch.cuda.get_device_properties fields), as an H100 SXM
# reports them; the H200 differs only in memory size and bandwidth, which Inductor does not read.
H100_PROPERTIES = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (fake_cuda stub)", major=9, minor=0, multi_processor_count=132,
    total_memory=80 * 2**30, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
    max_threads_per_block=1024, warp_size=32, L2_cache_size=50 * 2**20, shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472, shared_memory_per_block=49152, gcnArchName="", uuid="fake",
    is_integrated=False, is_multi_gpu_board=False, clock_rate=1980000, memory_clock_rate=2619000,
    memory_bus_width=5120, pci_bus_id=0, pci_device_id=0, pci_domain_id=0)


def missing_triton() -> str | None:
    """None where Triton (with its CUDA backend) is installed, else what is missing."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime import driver  # noqa: F401
    except ImportError as e:
        return f"triton with its CUDA backend is needed ({e})"
    return None


class StubTritonDriver:
    """An active Triton driver for an sm_90 CUDA target that cannot launch anything."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def get_device_interface(self):
        return torch.cuda


@contextlib.contextmanager
def stub_triton_driver(arch: int = 90) -> Iterator[StubTritonDriver]:
    """Make ``StubTritonDriver`` Triton's active driver inside the block."""
    from triton.runtime import driver

    from torch._inductor.runtime import triton_helpers

    stub = StubTritonDriver(arch)
    slot = "_active" if "_active" in vars(driver) else "active"  # Triton >= 3.4 / 3.3: without creating one
    previous = vars(driver)[slot]
    driver.set_active(stub)
    try:  # Inductor's compiled kernels would make the CUDA driver active: keep the stub
        with mock.patch.object(triton_helpers, "set_driver_to_gpu", lambda: None):
            yield stub
    finally:
        setattr(driver, slot, previous)


@contextlib.contextmanager
def pretend_sm90(properties=H100_PROPERTIES) -> Iterator[None]:
    """A CUDA device as autocast, the GradScaler and Inductor see it: available (to autocast and the
    GradScaler, which otherwise disable themselves), bf16-capable, with ``properties`` and compute
    capability 9.0 (the device-property queries of torch.cuda and of Dynamo's CUDA device
    interface, which Inductor's lowering, scheduler and code generation read).
    ``torch.cuda.is_available()`` itself stays False: FakeTensorMode reads it to keep from
    initialising the device."""
    from torch._dynamo.device_interface import CudaInterface
    import torch._inductor.scheduler as scheduler

    def props(device=None):
        return properties

    with contextlib.ExitStack() as stack:
        def patch(p):  # an attribute this torch does not have (older versions) needs no patch
            if hasattr(p.getter(), p.attribute):
                stack.enter_context(p)
        # torch.autocast("cuda") and GradScaler("cuda") disable themselves where CUDA is unavailable
        patch(mock.patch.object(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False))
        for where in (torch.cuda, CudaInterface):  # sm_90 computes bf16 natively
            patch(mock.patch.object(where, "is_bf16_supported", staticmethod(lambda including_emulation=True: True)))
        patch(mock.patch.object(torch.cuda, "get_device_properties", props))
        patch(mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: (9, 0)))
        patch(mock.patch.object(CudaInterface, "get_device_properties", staticmethod(props)))
        patch(mock.patch.object(CudaInterface, "get_compute_capability", staticmethod(lambda device=None: 90)))
        patch(mock.patch.object(CudaInterface, "is_triton_capable", staticmethod(lambda device=None: True)))
        patch(mock.patch.object(CudaInterface.Worker, "get_device_properties", staticmethod(props)))
        patch(mock.patch.object(CudaInterface.Worker, "current_device", staticmethod(lambda: 0)))
        patch(mock.patch.object(scheduler, "has_triton", lambda: True))  # it asks torch.cuda.is_available()
        yield


def fake_cuda_like(t: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    """A fake CUDA tensor of ``mode`` with ``t``'s shape, strides and dtype (made by a factory:
    moving a fake tensor to CUDA initialises the device on torch 2.7)."""
    with mode:
        return torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="cuda")


def to_fake_cuda(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """Replace ``module``'s parameters and buffers, and the tensors of plain objects it holds, in
    place, by fake CUDA tensors of ``mode`` with the same shapes, dtypes and strides (a
    channels-last weight stays channels-last)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(fake_cuda_like(p, mode), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = fake_cuda_like(b, mode)
        for value in vars(sub).values():  # tensors held by plain objects (the diffusion's schedule tables)
            if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor, type)):
                for name, t in list(vars(value).items()):
                    if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor):
                        setattr(value, name, fake_cuda_like(t, mode))
    return module


_TENSOR_DEEPCOPY = torch.Tensor.__deepcopy__


def _tensor_deepcopy(self, memo):
    """``Tensor.__deepcopy__`` that copies a fake tensor as a fake tensor (the trainer's EMA deep-copies
    the model): the plain one clones a storage that has no data."""
    if not isinstance(self, FakeTensor):
        return _TENSOR_DEEPCOPY(self, memo)
    if id(self) not in memo:
        copied = self.detach().clone()
        memo[id(self)] = torch.nn.Parameter(copied, self.requires_grad) if isinstance(self, torch.nn.Parameter) else copied
    return memo[id(self)]


# ------------------------------------------------------------------------------ autodiff executor
_FUNCTION_APPLY = torch.autograd.Function.__dict__["apply"]


def _recording_apply(cls, *args, **kwargs):
    """``autograd.Function.apply`` that notes on the backward node which forward arguments were
    tensors: the node's edges are those arguments', its ``backward`` returns one gradient per
    argument (the C++ engine keeps this mask itself, Python cannot read it there)."""
    out = _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)
    mask = tuple(isinstance(a, torch.Tensor) for a in args)
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(o, torch.Tensor) and isinstance(o.grad_fn, BackwardCFunction):
            o.grad_fn._fake_cuda_tensor_args = mask
    return out


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _run_graph(roots: Sequence[tuple], targets: dict) -> dict:
    """Run the backward graph from ``roots`` ((node, input_nr, grad) triples) and return the
    gradients reaching ``targets`` ({node: [input_nr, ...]}) as {(node, input_nr): grad}. Only
    nodes on a path to a target run; AccumulateGrad nodes never run."""
    order, seen, stack = [], set(), [(node, False) for node, _, _ in roots]
    needed = {}
    while stack:  # iterative post-order: the graph is thousands of nodes deep
        node, expanded = stack.pop()
        if expanded:
            needed[node] = node in targets or any(needed.get(n, False) for n, _ in node.next_functions if n is not None)
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((n, False) for n, _ in node.next_functions if n is not None and n not in seen)
    pending = {n: 0 for n in order if needed[n]}
    for n in pending:
        for m, _ in n.next_functions:
            if m is not None and m in pending:
                pending[m] += 1
    buffers: dict = {}

    def add(node, nr, g):
        buf = buffers.setdefault(node, [None] * len(node._input_metadata))
        buf[nr] = g if buf[nr] is None else buf[nr] + g

    for node, nr, g in roots:
        if node in pending:
            add(node, nr, g)
    found = {}
    ready = [n for n, count in pending.items() if count == 0]
    with torch.no_grad():  # the engine runs backward formulas with grad mode = create_graph (False here)
        _execute(ready, pending, buffers, targets, found, add)
    return found


def _execute(ready, pending, buffers, targets, found, add) -> None:
    while ready:
        node = ready.pop()
        buf = buffers.pop(node, None) or [None] * len(node._input_metadata)
        for nr in targets.get(node, ()):
            found[(node, nr)] = buf[nr]
        edges = node.next_functions
        if type(node).__name__ == "AccumulateGrad" or not any(m in pending for m, _ in edges if m is not None):
            outs = [None] * len(edges)
        elif isinstance(node, BackwardCFunction):  # a custom autograd.Function (our ops' autograd)
            grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                     for g, m in zip(buf, node._input_metadata)]  # materialize_grads, as the engine does
            outs = node.apply(*grads)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            if len(outs) != len(edges):
                mask = node._fake_cuda_tensor_args
                outs = [g for g, is_tensor in zip(outs, mask) if is_tensor]
        else:
            outs = node(*buf)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        if len(outs) != len(edges):
            raise RuntimeError(f"fake_cuda: {node.name()} returned {len(outs)} gradients for {len(edges)} edges")
        for (m, nr), g in zip(edges, outs):
            if m is None or m not in pending:
                continue
            if g is not None:  # the engine's validate_outputs: reduce broadcast shapes, cast dtypes
                meta = m._input_metadata[nr]
                if tuple(g.shape) != tuple(meta.shape):
                    g = g.sum_to_size(meta.shape)
                if g.dtype != meta.dtype:
                    g = g.to(meta.dtype)
                add(m, nr, g)
            pending[m] -= 1
            if pending[m] == 0:
                ready.append(m)


def _roots(outputs: list, grad_outputs: list) -> list:
    if len(grad_outputs) < len(outputs):
        grad_outputs = grad_outputs + [None] * (len(outputs) - len(grad_outputs))
    roots = []
    for out, g in zip(outputs, grad_outputs):
        if out.grad_fn is None:
            continue
        roots.append((out.grad_fn, out.output_nr, torch.ones_like(out) if g is None else g))
    return roots


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=None,
         is_grads_batched=False, materialize_grads=False):
    """``torch.autograd.grad`` through the Python executor (a gradient that does not reach an
    input is None, as with ``allow_unused=True``)."""
    if create_graph or is_grads_batched:
        raise NotImplementedError("fake_cuda.grad: create_graph / is_grads_batched are not supported")
    outputs, inputs = _as_list(outputs), _as_list(inputs)
    edges = [torch.autograd.graph.get_gradient_edge(t) for t in inputs]
    targets: dict = {}
    for e in edges:
        targets.setdefault(e.node, []).append(e.output_nr)
    found = _run_graph(_roots(outputs, _as_list(grad_outputs)), targets)
    result = [found.get((e.node, e.output_nr)) for e in edges]
    if materialize_grads:
        result = [torch.zeros_like(t) if g is None else g for g, t in zip(result, inputs)]
    return tuple(result)


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None, inputs=None):
    """``torch.autograd.backward`` through the Python executor: gradients accumulate into the
    ``.grad`` of the leaves the outputs depend on."""
    if create_graph:
        raise NotImplementedError("fake_cuda.backward: create_graph is not supported")
    outputs = _as_list(tensors)
    roots = _roots(outputs, _as_list(grad_tensors))
    leaves, seen, stack = {}, set(), [node for node, _, _ in roots]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves[node] = node.variable
        stack.extend(n for n, _ in node.next_functions if n is not None)
    if inputs is not None:
        wanted = {id(t) for t in _as_list(inputs)}
        leaves = {n: v for n, v in leaves.items() if id(v) in wanted}
    found = _run_graph(roots, {n: [0] for n in leaves})
    with torch.no_grad():
        for node, leaf in leaves.items():
            g = found.get((node, 0))
            if g is not None:
                leaf.grad = g if leaf.grad is None else leaf.grad + g


def _tensor_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    backward(self, gradient, retain_graph, create_graph, inputs=inputs)


@contextlib.contextmanager
def python_autograd() -> Iterator[None]:
    """Route ``torch.autograd.grad``, ``torch.autograd.backward`` and ``Tensor.backward`` through
    the Python executor inside the block."""
    with mock.patch.object(torch.autograd, "grad", grad), mock.patch.object(torch.autograd, "backward", backward), \
            mock.patch.object(torch.Tensor, "backward", _tensor_backward), \
            mock.patch.object(torch.autograd.Function, "apply", classmethod(_recording_apply)):
        yield


@contextlib.contextmanager
def fake_cuda(arch: int = 90) -> Iterator[FakeTensorMode]:
    """All of the above: yields the FakeTensorMode (entered), with the stub driver, the sm_90
    device properties and the Python autodiff executor in force."""
    mode = FakeTensorMode()
    with stub_triton_driver(arch), pretend_sm90(), python_autograd(), \
            mock.patch.object(torch.Tensor, "__deepcopy__", _tensor_deepcopy), \
            mode:
        yield mode
