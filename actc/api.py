"""``actc.explain``: the per-tensor plan for a model, from Python.

    >>> print(actc.explain(model, x, memory_budget="2bit"))
    graph  name   shape      dtype    producer  bits  before  after  reason
    0      addmm  (64, 256)  float32  addmm     2     65536   4608
    ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actc.backend import compile_with_session
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
