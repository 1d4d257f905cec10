"""Inductor's Triton backend on CPU tensors: the code GPU users get, generated (and, small, run) here.

Checked on torch 2.13.0 + triton 3.7.1 (../shared/NOTES.md §9). ``triton_backend()`` patches six private
torch names, all of them in this file:

- ``torch._inductor.config.cpu_backend = "triton"``: Inductor schedules CPU tensors with its Triton backend;
- ``torch.utils._triton.triton_backend`` / ``triton_hash_with_backend``: without a GPU they raise
  "0 active drivers" during code generation; they return None / a constant instead;
- ``torch._inductor.runtime.triton_helpers.libdevice``: the interpreter has no libdevice (erf, floor, ...);
  ``triton.language.math`` has the same functions under the same names, except ``signbit``, which it lacks:
  ``_signbit`` below, a triton.jit function at module level, stands in for it;
- ``CachingAutotuner.run`` (only with ``execute=False``): code is generated and no kernel runs. The outputs
  are then garbage, but counting kernels at useful sizes takes seconds, where the interpreter takes
  minutes. Integer tensors a kernel touches are zeroed, so that the fallback ops that index with them
  (``scatter`` in a max-pool backward) stay in bounds.

- ``TritonKernel.inductor_meta_per_kernel``: wrapped to always record Inductor's own estimate of each kernel's
  bytes (``estimate_kernel_num_bytes``, which it writes as ``kernel_num_gb`` only under its benchmark
  options, whose harness does not run on the interpreter). The estimate counts its first argument twice
  whenever the kernel dropped an in-place buffer (``RemovedArg`` entries count as in-place arguments), so it
  is taken with those entries left out.
- ``Scheduler.codegen`` (only inside ``scheduled_nodes()``): wrapped to record, for every node left after
  fusion, what Inductor's own GPU roofline (``BaseSchedulerNode._get_estimated_runtime``, which returns 0 off
  the GPU) reads: ``estimate_flops()`` and ``get_read_write_buffers_sizes()``, with the output's dtype.

Running kernels needs TRITON_INTERPRET=1 in the environment before triton is first imported (triton jit's its
own helpers at import), so the tests that use this run in a process of their own.
"""
from __future__ import annotations

import contextlib
import re
from unittest import mock

import torch
import triton
import triton.language as tl
from torch._inductor.utils import run_and_get_code

_KERNEL = re.compile(r"^(triton_\w+) = async_compile\.triton\(", re.M)
_NUM_GB = re.compile(r"'kernel_num_gb': ([0-9.e+-]+)")


@triton.jit
def _signbit(x):
    """libdevice's signbit, which ``tl.math`` lacks: the sign bit of the value converted to fp32, which keeps
    it for every float, -0.0 and NaN included."""
    return x.to(tl.float32).to(tl.int32, bitcast=True) < 0


class _LibdeviceFromMath:
    def __getattr__(self, name: str):
        if name == "signbit":
            return _signbit
        if hasattr(tl.math, name):
            return getattr(tl.math, name)
        raise AttributeError(name)


def _zero_integer_tensors(self, *args, **kwargs) -> None:
    for a in args:
        if isinstance(a, torch.Tensor) and not a.is_floating_point():
            a.zero_()


@contextlib.contextmanager
def triton_backend(execute: bool = False):
    """Compile CPU tensors with Inductor's Triton backend inside this block (see the module docstring)."""
    import torch._inductor.config as config
    import torch._inductor.runtime.triton_helpers as helpers
    import torch._inductor.runtime.triton_heuristics as heuristics
    import torch.utils._triton as utils_triton
    from torch._inductor.codegen.common import RemovedArg
    from torch._inductor.codegen.triton import TritonKernel

    meta_per_kernel = TritonKernel.inductor_meta_per_kernel

    def with_bytes(self):
        live = {k: v for k, v in self.args.inplace_buffers.items() if not isinstance(v, RemovedArg)}
        with mock.patch.object(self.args, "inplace_buffers", live):
            nbytes = self.estimate_kernel_num_bytes()
        return {**meta_per_kernel(self), "kernel_num_gb": nbytes / 1e9}

    with contextlib.ExitStack() as stack:
        stack.enter_context(config.patch(cpu_backend="triton", compile_threads=1, force_disable_caches=True))
        stack.enter_context(mock.patch.object(TritonKernel, "inductor_meta_per_kernel", with_bytes))
        stack.enter_context(mock.patch.object(utils_triton, "triton_backend", lambda: None))
        stack.enter_context(mock.patch.object(utils_triton, "triton_hash_with_backend", lambda: "cpu-interpreter"))
        stack.enter_context(mock.patch.object(helpers, "libdevice", _LibdeviceFromMath()))
        if not execute:
            stack.enter_context(mock.patch.object(heuristics.CachingAutotuner, "run", _zero_integer_tensors))
        yield


@contextlib.contextmanager
def scheduled_nodes():
    """Record every scheduled (fused) node of the graphs compiled inside this block: yields a list that fills
    with dicts {kind: "extern" | "kernel", flops: int, bytes: int, dtype: torch.dtype | None}, forward
    graphs before their backward. Kernels that only alias or reinterpret buffers (no-ops) are left out."""
    from torch._inductor import scheduler

    nodes: list[dict] = []
    codegen = scheduler.Scheduler.codegen

    def recording(self):
        for node in self.nodes:
            if isinstance(node, scheduler.NopKernelSchedulerNode):
                continue
            outputs = node.get_outputs()
            dtype = outputs[0].node.maybe_get_dtype() if outputs else None
            nodes.append(dict(kind="extern" if node.is_extern() else "kernel", flops=node.estimate_flops() or 0,
                              bytes=node.get_read_write_buffers_sizes() or 0, dtype=dtype))
        return codegen(self)

    with mock.patch.object(scheduler.Scheduler, "codegen", recording):
        yield nodes


def kernels(code: str) -> list[str]:
    """The Triton kernels one generated wrapper defines."""
    return _KERNEL.findall(code)


def kernel_bytes(code: str) -> int:
    """Inductor's own estimate of the bytes all kernels of one wrapper read and write (once each)."""
    return round(sum(float(g) for g in _NUM_GB.findall(code)) * 1e9)


def forward_backward_code(model: torch.nn.Module, inputs: tuple, backend: str, options: dict | None = None,
                          loss=lambda out: out.float().square().mean()) -> list[str]:
    """Compile ``model`` with ``backend`` and return the wrappers of one forward and backward, in that order
    (kernels not executed)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options)
    with triton_backend(execute=False):
        _, codes = run_and_get_code(lambda: loss(compiled(*inputs)).backward())
    return codes
