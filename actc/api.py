"""The Python entry points: ``actc.compile`` (train with it) and ``actc.explain`` (the per-tensor plan).

    >>> actc.compile(model, memory_budget="2bit")      # in place, like model.compile; bad options raise here
    >>> print(actc.explain(model, x, memory_budget="2bit"))
    graph  name   shape      dtype    producer  bits  before  after  reason
    0      addmm  (64, 256)  float32  addmm     2     65536   4608
    ...
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from actc.backend import actc_backend, compile_with_session, mode_patches
from actc.config import ActcConfig
from actc.plan import GraphPlan, table, to_json
from actc.session import Session


@dataclass
class Explanation:
    plans: list[GraphPlan]

    def __str__(self) -> str:
        return table(self.plans)

    def to_json(self, include_code: bool = True) -> str:
        return to_json(self.plans, include_code)

    @property
    def bytes_before(self) -> int:
        return sum(p.bytes_before for p in self.plans)

    @property
    def bytes_after(self) -> int:
        return sum(p.bytes_after for p in self.plans)


def compile(model: torch.nn.Module, *, dynamic: bool | None = None, fullgraph: bool = False,
            mode: str | None = None, **options: Any) -> torch.nn.Module:
    """Compile ``model`` in place with actc, as ``model.compile(backend="actc", options=options)`` would,
    and return it.

    The difference is when errors come: every option (and ``mode``) is checked here, so a typo raises
    ``ActcOptionError`` naming the option, the value and what is valid, instead of a
    ``BackendCompilerFailed`` at the first forward. ``mode`` ("max-autotune", ...) is applied as Inductor
    applies it, together with the options (``torch.compile`` accepts only one of the two).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"actc.compile takes an nn.Module (got {type(model).__name__}); "
                        f"for a function use torch.compile(fn, backend='actc', options=...)")
    ActcConfig.from_options(options)
    mode_patches(mode)
    backend = functools.partial(actc_backend, options=options, mode=mode)
    model.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    return model


def explain(model: torch.nn.Module, *inputs: Any, dynamic: bool | None = None, **options: Any) -> Explanation:
    """Compile ``model`` with actc, run one forward on ``inputs`` and return the plan of every graph.

    Nothing is trained: no backward runs and no gradient is touched. Inductor's caches are bypassed and
    dynamo's compiled frames are reset first (dynamo would otherwise reuse a frame compiled earlier for a
    model of the same class), so the partitioner really runs; other compiled models recompile on next use.
    """
    torch._dynamo.reset()
    session = Session(ActcConfig.from_options(options))

    def backend(gm, example_inputs):
        return compile_with_session(gm, example_inputs, session)

    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        with torch.enable_grad():
            compiled(*inputs)
            if any(r.forced is not None for r in session.regions.values()):
                compiled(*inputs)  # a later graph re-planned an earlier one (absolute budget): recompile it
    return Explanation(plans=session.plans)
