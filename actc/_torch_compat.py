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


def after_graph_seeds(gm: fx.GraphModule) -> fx.Node:
    """The node after which a new random draw goes so that the graph's own seeds draw first.

    2.11, 2.13: Inductor's joint-graph pass ``replace_random_passes`` has already turned the graph's
    aten.rand/dropout into one ``prims.inductor_seeds`` call, which draws from torch's generator when it
    runs. Under plain Inductor it is the forward's first draw; it must stay first, or every dropout mask would
    change. It is moved to the top (it takes only constants), and the anchor is the last of them (or the last
    placeholder)."""
    anchor = gm.graph.find_nodes(op="placeholder")[-1]
    for node in graph_seeds(gm):
        if node is not anchor.next:
            anchor.append(node)
        anchor = node
    return anchor


def graph_seeds(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's own seed draws (``prims.inductor_seeds``, 2.11 and 2.13), in graph order."""
    return list(gm.graph.find_nodes(op="call_function", target=torch.ops.prims.inductor_seeds.default))


def fake_like(like: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A fake tensor of ``shape`` and ``dtype`` on ``like``'s device, in ``like``'s fake mode."""
    fake_mode = detect_fake_mode([like])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        return torch.empty(shape, dtype=dtype, device=like.device)


def uses_triton(device: torch.device) -> bool:
    """Whether Inductor generates Triton code for tensors on ``device`` (2.11, 2.13: ``cpu_backend`` is
    "cpp" by default, and every GPU backend but Halide and Pallas is Triton)."""
    backend = torch._inductor.config.cpu_backend if device.type == "cpu" else torch._inductor.config.cuda_backend
    return backend == "triton"


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


# 2.13 (2.11 not checked; on a class that is not a singleton the patch changes nothing): Inductor's codegen
# (CSEProxy._default, codegen/common.py) calls DtypePropagationOpsHandler() for every op it writes. The class is
# a singleton through __new__, but Python reruns __init__ on every call, and __init__ re-registers each dtype
# rule and checks the set against dir(self): about 0.25 ms an op. Inductor's own graphs write a few thousand
# ops; actc's quantizer kernels write tens of thousands (the hash and the endpoint logic, once per kernel
# variant), and __init__ was a large share of the codegen in a cProfile of an actc compile. The patch reruns
# __init__ only when the rule tables have changed size (Inductor registers rules at import and may add more
# later; a rule replaced under the same name would not be seen), so the handler's attributes, hence every
# generated kernel, stay the same (tests/test_codegen_patch.py).
def skip_repeated_dtype_rule_setup() -> None:
    try:
        from torch._inductor.dtype_propagation import DtypePropagationOpsHandler
    except ImportError:  # a layout this file was not checked on: codegen stays as it is
        return
    if not getattr(DtypePropagationOpsHandler.__init__, "actc_original", None):
        DtypePropagationOpsHandler.__init__ = once_per_rule_tables(DtypePropagationOpsHandler.__init__)


def once_per_rule_tables(init):
    """``init`` wrapped to run on an instance only when the sizes of Inductor's rule tables differ from
    the last run's (``init.actc_original`` is Inductor's own)."""
    from torch._inductor import utils
    from torch._inductor.codegen import common

    def __init__(self) -> None:
        tables = (len(utils.op_dtype_propagation_rules), len(common.pointwise_overrides_data))
        if self.__dict__.get("_actc_tables") != tables:
            init(self)
            self._actc_tables = tables

    __init__.actc_original = init
    return __init__


# 2.11, 2.13: Inductor's recompute budget (torch._functorch.config.activation_memory_budget), read by the
# stock partitioner when it runs, so a patch around compile_fx applies to that compile alone.
def inductor_recompute_budget() -> float:
    return float(torch._functorch.config.activation_memory_budget)


def recompute_budget(value: float):
    return torch._functorch.config.patch(activation_memory_budget=value)


def _draws(node: fx.Node) -> bool:
    """Does the node draw random numbers? An op tagged nondeterministic_seeded does, unless its ``dropout_p``
    argument is 0 (2.13 tags every attention op, _scaled_dot_product_flash_attention_for_cpu included, for
    its optional dropout): recomputed then, it gives the same values, as Inductor's own partition assumes."""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    p = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else schema.arguments[i].default_value)
    return not (isinstance(p, (int, float)) and p == 0)


def keep_saved(joint: fx.GraphModule, picks=lambda node: False, statistic=lambda node: False) -> list[fx.Node]:
    """Tag the joint graph's random draws, the forward's ops that pick elements by value, and its
    normalization statistics, MUST_SAVE, so that the partitioner never recomputes them.

    2.13 (checked by hand): under a recompute budget below 1, ``choose_saved_values_set`` lets its knapsack
    un-ban every banned node, random ones included, and a budget of 0 recomputes everything from the inputs.
    On CPU, where RNG ops are not functionalized, the backward then draws ``prims.inductor_seeds`` again and
    recomputes dropout with another mask than the forward's: a wrong gradient (cosine 0.90 on a dropout MLP,
    bench/probe_recompute_dropout.py). The seed tensor saved instead is a few int64s, and the draws that
    depend on it (``inductor_random``) replay exactly.
    ``picks(node)``: does the node pick elements by value (passes/candidates.SELECT_OPS)? Such an op that
    returns indices, a max-pool (or max, sort, top-k), recomputed in the backward from data that actc then compresses would
    pick other elements than the forward did, and route the gradient there (a biased gradient, measured on
    a ConvNet at 2 bits). Saved, its indices stay exact (int8 offsets for Inductor's max-pool) and its values
    are read linearly. ``statistic(node)``: is it a normalization's statistic (a variance, a mean of squares)?
    Recomputed in the backward, it would be recomputed from the compressed input, and E[x̂²] = x² + Var(e)
    does not average out, so that input would need 8 bits. Saved, it costs one value per row or channel and
    the input is read linearly. Nodes that already carry a policy (torch.utils.checkpoint's tags) keep it;
    nodes that depend on a tangent (the backward's own ops) are left alone. Returns the nodes tagged."""
    from torch.utils.checkpoint import CheckpointPolicy

    backward = {n for n in joint.graph.find_nodes(op="placeholder") if n.name.startswith("tangents")}
    tagged = []
    for node in joint.graph.nodes:
        if any(a in backward for a in node.all_input_nodes):
            backward.add(node)
            continue
        if node.op != "call_function" or node.meta.get("recompute") is not None:
            continue
        indices = picks(node) and not isinstance(node.meta.get("val"), torch.Tensor)  # with indices: a tuple
        stat = statistic(node)
        if _draws(node) or indices or stat:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            tagged.append(node)
            if indices or stat and not isinstance(node.meta.get("val"), torch.Tensor):
                # what the partitioner saves are the tuple's items
                for user in node.users:
                    if user.meta.get("recompute") is None:
                        user.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                        tagged.append(user)
    return tagged
