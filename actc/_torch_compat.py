"""Every private torch API that actc uses, in one place.

Checked against torch 2.11.0 (GPU image) and 2.13.0 (CPU wheel). Each block says what differs.
Nothing outside this file imports from ``torch._*`` except the names re-exported here.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import sympy
import torch
import torch.fx as fx

# 2.11, 2.13: the partitioner hook (torch._inductor.config.custom_partitioner_fn takes an instance)
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files  # noqa: F401
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: F401
from torch._inductor.compile_fx import compile_fx  # noqa: F401
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.virtualized import V
from torch._guards import detect_fake_mode  # noqa: F401
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import is_symbolic  # noqa: F401
from torch.utils._sympy.value_ranges import bound_sympy

# 2.13 removed hint_int / size_hint helpers in favour of optimization_hint; 2.11 has hint_int.
try:  # torch >= 2.13
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _hint
except ImportError:  # torch 2.11, 2.12
    from torch.fx.experimental.symbolic_shapes import hint_int as _hint  # type: ignore[no-redef]

# 2.11 and 2.13: output descriptors live in meta["desc"] of the forward's output node.
try:
    from torch._functorch._aot_autograd.descriptors import SavedForBackwardsAOTOutput
except ImportError:  # older layouts: no descriptors to rebuild
    SavedForBackwardsAOTOutput = None  # type: ignore[assignment,misc]


def hint(x: Any, fallback: int = 8192) -> int:
    """A concrete int for an int or SymInt, without adding a guard."""
    if isinstance(x, int):
        return x
    try:
        return int(_hint(x, fallback=fallback))
    except Exception:
        return fallback


def upper_bound(x: Any, fallback: int = 8192) -> int:
    """Worst-case value of an int or SymInt expression; its hint where the range is unbounded."""
    if isinstance(x, int):
        return x
    expr = x.node.expr
    shape_env = x.node.shape_env
    try:
        upper = bound_sympy(expr, shape_env.var_to_range).upper
        if upper.is_finite and not math.isinf(float(upper)):
            return int(upper)
    except Exception:
        pass
    return hint(x, fallback)


def lower_bound(x: Any) -> int:
    """Least value of an int or SymInt expression over its symbols' ranges (dynamo's default minimum is 2)."""
    if isinstance(x, int):
        return x
    try:
        lower = bound_sympy(x.node.expr, x.node.shape_env.var_to_range).lower
        return int(lower) if lower.is_finite else 0
    except Exception:
        return 0


def sym_expr(x: Any) -> sympy.Expr | int:
    return x if isinstance(x, int) else x.node.expr


def trace(fn, *args) -> fx.GraphModule:
    """Trace ``fn`` to aten ops under Inductor's decompositions, on the graph's fake values.

    2.11, 2.13: make_fx in "real" mode on fake tensors (and SymInts) from the graph's FakeTensorMode,
    as Inductor's own pattern replacement does (pattern_matcher.fwd_only).
    """
    fake_mode = detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)])
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    # The quantizer's shape logic (groups, padding, packing) holds for every size; the checks that tracing it
    # makes on a symbolic size (is the group count 1?) must not become guards, or a user's
    # mark_dynamic(min=..., max=...) range would be violated and dynamo would refuse to compile.
    shape_env = getattr(fake_mode, "shape_env", None)
    quiet = shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()
    with ctx, quiet, torch.fx.traceback.preserve_node_meta():
        from torch._dispatch.python import enable_python_dispatcher

        with enable_python_dispatcher():
            gm = make_fx(fn, select_decomp_table(), tracing_mode="real")(*args)
    gm.graph.eliminate_dead_code()
    return gm


def replace_random(gm: fx.GraphModule) -> None:
    """Turn aten.rand into Inductor's seeded RNG prims (seeded from torch's generator).

    2.11, 2.13: Inductor has no lowering for aten.rand outside fallback_random; its joint-graph pass
    ``replace_random_passes`` rewrites it, and needs V.fake_mode set.
    """
    from torch._inductor.fx_passes.replace_random import replace_random_passes

    seeds_op = torch.ops.prims.inductor_seeds.default
    before = gm.graph.find_nodes(op="call_function", target=seeds_op)
    fake_mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    with V.set_fake_mode(fake_mode):
        replace_random_passes(gm)
    # The seeds op draws from torch's generator when it runs. The graph's own seeds (dropout's, fused by the
    # joint-graph pass) must draw first, as they do under plain Inductor, or every dropout mask would change:
    # move all seeds ops (they take only constants) to the top, the graph's own first.
    added = [n for n in gm.graph.find_nodes(op="call_function", target=seeds_op) if n not in before]
    anchor = gm.graph.find_nodes(op="placeholder")[-1]
    for node in (*before, *added):
        anchor.append(node)
        anchor = node


def has_symbolic_inputs(gm: fx.GraphModule, example_inputs) -> bool:
    """Does dynamo's graph take symbolic sizes (dynamic shapes)? 2.11, 2.13: meta["example_value"]."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor) and any(
                not isinstance(s, int) for s in (*value.shape, *value.stride()))):
            return True
    return any(isinstance(x, torch.SymInt) for x in example_inputs)


# 2.11, 2.13: torch's logging registry. TORCH_LOGS="actc" already resolves as a module name; registering
# the alias also lists it in TORCH_LOGS="help" and lets torch._logging.set_logs(actc=logging.INFO) work.
def register_torch_log(name: str) -> None:
    try:
        from torch._logging._internal import log_registry, register_log
    except ImportError:  # a layout this file was not checked on: TORCH_LOGS still finds the module
        return
    if not log_registry.is_log(name):
        register_log(name, name)
