"""Find the tensors that the forward saves for the backward, and decide which ones may be compressed.

    fw outputs:  (user outs..., addmm, permute_3, gt, getitem_1 (LN rstd), primals_3, s0)
                                  │        │       │        │                  │        └ SymInt: not a tensor
                                  │        │       │        │                  └ primal: skip (compressed if
                                  │        │       │        │                    an earlier graph's activation)
                                  │        │       │        └ below payoff: skip
                                  │        │       └ bool mask: exact 1-bit
                                  └────────┴ permute_3 = addmm.permute(...): one group, compressed once at addmm
    → [Saved(addmm, aliases=[addmm, permute_3], kind="quant"), Saved(gt, kind="mask"), Saved(..., kind="skip")]

Every record carries a reason when it is skipped, so that the plan can say why a tensor was left alone.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from actc import _torch_compat as compat
from actc.config import ActcConfig
from actc.kernels import quant
from actc.passes.reach import FLOATS, extreme_values, grad_reach, is_view, op_name, parameter_derived


# Ops whose later outputs are per-row statistics (softmax logsumexp, normalization mean/rstd): an error in
# them scales whole rows of the gradient, and they are small, so they stay exact.
STATISTIC_PRODUCERS = ("scaled_dot_product", "layer_norm", "batch_norm", "group_norm", "rms_norm",
                       "flash_attention", "efficient_attention", "cudnn_attention")
LINEAR_CONSUMERS = {"mm", "addmm", "bmm", "baddbmm", "convolution_backward", "matmul", "linear"}
# How the backward reads a saved tensor decides whether its rounding noise averages out. Stochastic rounding
# is unbiased, E[x̂] = x, so any backward that is linear in x̂ gets an unbiased gradient. A nonlinear f gets
# E[f(x̂)] = f(x) + f''(x)·Var(e)/2 + ...: a bias that grows with the squared quantization step. For exp that
# bias is a factor E[exp(e)] on every output (a 2-bit step over logits spanning 12 nats adds e up to ±4, an
# error of 10× and more), so tensors that reach an exponential need a fine step; bounded smooth functions
# (GELU's erf, tanh, sigmoid, roots) have bounded curvature and need a moderate one.
EXP_OPS = {"exp", "exp2", "expm1", "_softmax", "_log_softmax", "logsumexp", "_log_softmax_backward_data"}
SMOOTH_OPS = {"erf", "erfc", "tanh", "sigmoid", "log", "log1p", "log2", "sqrt", "rsqrt", "reciprocal", "sin",
              "cos", "gelu_backward", "silu_backward", "sigmoid_backward", "tanh_backward", "mish_backward",
              "softplus_backward", "elu_backward", "log_sigmoid_backward"}
# Statistics of a recomputed normalization (decomposed or not): the reductions, and the fused norms.
STAT_REDUCTIONS = {"var", "var_mean", "std", "std_mean"}
STAT_OPS = STAT_REDUCTIONS | {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                              "_native_batch_norm_legit_no_training", "_batch_norm_with_update", "native_layer_norm",
                              "native_group_norm"}
ELEMENTWISE = {"add", "sub", "rsub", "mul", "div", "neg", "view", "reshape", "expand", "permute", "clone",
               "convert_element_type", "squeeze", "unsqueeze"}
# Attention backwards recompute softmax(q·kᵀ) from the saved q and k; v, out and the gradient enter linearly.
ATTENTION_BACKWARD = "scaled_dot_product"
ATTENTION_EXP_ARGS = (1, 2)
# Ops that pick elements by value: a max-pool, max or sort that the backward recomputes (Inductor's recompute
# budget, activation checkpointing) from rounded data picks other elements than the forward did, and routes
# the gradient there; E[max(z + e)] > max(z) besides. No width is fine enough: such a tensor stays exact.
SELECT_OPS = {"_low_memory_max_pool_with_offsets", "max_pool2d_with_indices", "max_pool3d_with_indices",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "fractional_max_pool2d", "fractional_max_pool3d",
              "max", "min", "maximum", "minimum", "argmax", "argmin", "sort", "topk", "kthvalue", "median", "mode"}
# The fewest bits each consumer class may get (passes/partition.py drops the narrower widths; "select":
# none, the tensor stays exact).
MIN_BITS = {"linear": 1, "other": 1, "smooth": 4, "stat": 8, "exp": 8, "select": 64}
_RANK = ("linear", "other", "smooth", "stat", "exp", "select")  # worst last


@dataclass
class Saved:
    """One compressible unit: a root tensor of the forward and the saved tensors that alias it."""

    node: fx.Node                       # the forward node that gets compressed (the alias root)
    aliases: list[fx.Node]              # saved forward outputs re-derived from ``node`` in the backward
    kind: str                           # "quant" | "mask" | "skip"
    reason: str = ""
    numel: int = 0                      # worst case under dynamic shapes
    full_bytes: int = 0
    perm: tuple[int, ...] = ()
    consumer: str = ""                  # how the backward reads it: "linear" | "other" | "smooth" | "stat" | "exp"
    consumer_op: str = ""               # the op that made it "smooth" or "exp"
    spread: float = 1.0                 # elements of the backward each stored element reaches (broadcasts)
    activation: bool = True             # False for primals and parameter-derived tensors: not counted
    dynamic: bool = False
    added: bool = False                 # a mask that actc moved into the forward: Inductor did not save it

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def dtype(self) -> torch.dtype:
        return self.node.meta["val"].dtype

    @property
    def producer(self) -> str:
        target = self.node.target
        return getattr(target, "__name__", str(target)).split(".")[0] if self.node.op == "call_function" else self.node.op


def alias_chain(node: fx.Node) -> list[fx.Node]:
    """[root, view1, ..., node]: the views that lead from the root storage to ``node``."""
    chain = [node]
    while is_view(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain[::-1]


def replayable(chain: list[fx.Node]) -> bool:
    """Can the views be rebuilt in the backward? Only when their other arguments are constants."""
    for view in chain[1:]:
        leaves = torch.fx.node.map_aggregate((view.args[1:], view.kwargs), lambda a: a)
        flat = []
        torch.fx.node.map_aggregate(leaves, lambda a: flat.append(a))
        if any(isinstance(a, (fx.Node, torch.SymInt)) for a in flat):
            return False
    return True


def dense_perm(val: torch.Tensor) -> tuple[int, ...] | None:
    """Memory-order permutation when the tensor is dense and non-overlapping, else None."""
    shape = [compat.hint(s) for s in val.shape]
    strides = [compat.hint(s) for s in val.stride()]
    perm = quant.memory_order(shape, strides)
    expected = 1
    for d in reversed(perm):
        if shape[d] != 1 and strides[d] != expected:
            return None
        expected *= shape[d]
    return perm


def is_statistic(node: fx.Node) -> bool:
    """Is this forward op a normalization's statistic: a variance (BatchNorm, LayerNorm: var_mean) or a mean or
    sum of squares (RMSNorm), each over at least 8 elements per value? When the backward recomputes one (a
    BatchNorm under Inductor's recompute budget), partition.py partitions again with the forward's statistics
    saved (a few bytes per row or channel), so that their input is read linearly and not as "stat", which
    needs 8 bits (consumer_class)."""
    if node.op != "call_function":
        return False
    name = op_name(node)
    if name in ("mean", "sum") and node.args and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        square = op_name(src) == "pow" and len(src.args) > 1 and src.args[1] == 2 \
            or op_name(src) == "mul" and len(src.args) > 1 and src.args[0] is src.args[1] or op_name(src) == "square"
    else:
        square = False
    if not (name in STAT_REDUCTIONS or square):
        return False
    inp, out = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None, node.meta.get("val")
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(inp, torch.Tensor) or not isinstance(out, torch.Tensor) or not inp.dtype.is_floating_point:
        return False
    return compat.hint(inp.numel()) >= 8 * max(compat.hint(out.numel()), 1)


def consumer_class(bw: fx.GraphModule, names: list[str]) -> tuple[str, str]:
    """(class, op) for the worst way the backward reads the tensor saved as ``names``, following its values
    through every op (a recompute in the backward included) up to comparisons, whose exact masks
    passes/hoist.py moves into the forward:

        select  an op that picks elements by value (max-pool, max, sort): kept exact
        exp     an exponential, softmax, log-softmax backward, or q/k of an attention backward
        stat    statistics recomputed from it (a BatchNorm the partitioner recomputes: var_mean, or a sum of
                squares): E[x̂²] = x² + Var(e), so the error does not average out over the reduction
        smooth  another transcendental (GELU's erf and exp(-x²/2), tanh, sigmoid, roots), a division by it
        linear  only matmul/conv operands and linear elementwise ops (add, scale, mask, views, sums)
        other   linear elementwise ops alone, no matmul or conv

    A square of it that meets the gradient element by element (a decomposed tanh backward: g · (1 - ŷ²)) is
    smooth too. Products of two of its values that involve the incoming gradient (LayerNorm's backward:
    x̂ · Σ g x̂ / n) are left "linear": there the squared error is divided by the reduced width.
    """
    derived = {n for n in bw.graph.find_nodes(op="placeholder") if n.name in names}
    gradient = {n for n in bw.graph.find_nodes(op="placeholder") if n.name.startswith("tangents")}
    squared: set[fx.Node] = set()  # forward values recomputed through a product of two derived values or a power
    worst, op, linear = "other", "", False
    for node in bw.graph.nodes:
        if node.op != "call_function":
            continue
        if any(n in gradient for n in node.all_input_nodes):
            gradient.add(node)
        if not any(n in derived for n in node.all_input_nodes):
            continue
        name = op_name(node)
        hits = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in derived]
        if name.endswith(("_backward", "_backward_data")):  # linear in the incoming gradient, argument 0
            nonlinear = [i for i in hits if i > 0]
        else:
            nonlinear = hits
        attention = ATTENTION_BACKWARD in name
        if name in EXP_OPS and nonlinear or attention and any(i in ATTENTION_EXP_ARGS for i in hits):
            # exp(-x²/2) (GELU's density) is bounded with bounded derivatives: smooth, not exponential
            cls = "smooth" if any(node.args[i] in squared for i in nonlinear) else "exp"
        elif name in SELECT_OPS and nonlinear:
            cls = "select"
        elif name in STAT_OPS or name in ("sum", "mean") and any(node.args[i] in squared for i in hits):
            cls = "stat"
        elif name in SMOOTH_OPS and nonlinear or name == "div" and 1 in hits:
            cls = "smooth"
        elif node in gradient and any(n in squared for n in node.all_input_nodes):
            cls = "smooth"  # a square meets the gradient element by element: tanh's g·(1 - ŷ²), E[ŷ²] = y² + Var(e)
        else:
            cls = "other"
            linear |= name in LINEAR_CONSUMERS or "convolution_backward" in name or attention
        if _RANK.index(cls) > _RANK.index(worst):
            worst, op = cls, name
        if node not in gradient and (name == "pow" or name == "mul" and len(hits) > 1
                                     or name in ELEMENTWISE and any(n in squared for n in node.all_input_nodes)):
            squared.add(node)
        val = node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.dtype == torch.bool):  # comparisons: exact masks (hoist)
            derived.add(node)
    return ("linear" if worst == "other" and linear else worst), op


def broadcast_factor(bw: fx.GraphModule, names: list[str]) -> float:
    """How many elements each stored element becomes where the backward reads it: the largest numel ratio
    of an expand, or of a pointwise op that broadcasts it (a position embedding added to a batch of token
    embeddings: the batch size), over the saved tensor's own numel; 1 if nothing broadcasts it.

    One stored error then reaches that many elements of the backward, all with the same sign. For the
    gradient that sums them this is at least as much variance as independent errors on the broadcast
    tensor (equal when the local derivatives are uncorrelated, up to the factor again when they agree), so
    the tensor weighs as the broadcast tensor would: numel · factor (passes/partition.py, sensitivity.py).
    """
    factor = 1.0
    for start in bw.graph.find_nodes(op="placeholder"):
        if start.name not in names or not isinstance(start.meta.get("val"), torch.Tensor):
            continue
        own = math.prod(compat.upper_bound(s) for s in start.meta["val"].shape)
        frontier, seen = [start], {start}
        while frontier:
            for user in frontier.pop().users:
                val = user.meta.get("val")
                if user in seen or not isinstance(val, torch.Tensor):
                    continue
                seen.add(user)
                if is_view(user):
                    frontier.append(user)
                elif torch.Tag.pointwise not in getattr(user.target, "tags", ()):
                    continue
                factor = max(factor, math.prod(compat.upper_bound(s) for s in val.shape) / max(own, 1))
    return factor


def find_candidates(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int,
                    static_indices: list[int] | None, config: ActcConfig,
                    hoisted: frozenset[str] = frozenset(), needs_grad: frozenset[str] | None = None,
                    activation_inputs: frozenset[str] = frozenset()) -> list[Saved]:
    """One ``Saved`` record per saved tensor storage, in the order the forward returns them.

    ``hoisted``: bool masks that ``hoist_comparisons`` moved into the forward; they are always packed,
    whatever their size, since they replace the exact comparison of a compressed tensor.
    ``needs_grad``: names of the forward's primals that require grad (``grad_reach``); None: unknown.
    ``activation_inputs``: primals that are activations of an earlier graph (``backend.activation_inputs``):
    compressed like the forward's own tensors; every other primal is saved as it is.
    """
    outputs = list(fw.graph.find_nodes(op="output")[0].args[0])
    user_outputs = {n for n in outputs[:num_fwd_outputs] if isinstance(n, fx.Node)}
    saved = [n for n in outputs[num_fwd_outputs:]
             if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]
    params = parameter_derived(fw, static_indices)
    reach = grad_reach(fw, static_indices, needs_grad)
    extreme = extreme_values(fw)
    groups: dict[fx.Node, list[fx.Node]] = {}
    chains: dict[fx.Node, list[fx.Node]] = {}
    for node in saved:
        chains[node] = alias_chain(node)
        groups.setdefault(chains[node][0], []).append(node)

    records = []
    for root, aliases in groups.items():
        rec = _classify(root, aliases, chains, user_outputs, params, bw, config, hoisted, activation_inputs)
        if rec.kind == "quant" and reach is not None and rec.node not in reach:
            rec.kind, rec.reason = "skip", "not an activation: computed from inputs that need no grad, kept exact"
        elif rec.kind == "quant" and rec.node in extreme:
            rec.kind, rec.reason = "skip", f"may hold {extreme[rec.node]:g} (a constant in the forward), kept exact"
        records.append(rec)
    return records


def _classify(root, aliases, chains, user_outputs, params, bw, config, hoisted=frozenset(),
              activation_inputs=frozenset()) -> Saved:
    # A single saved view of an otherwise unsaved root is compressed as itself (fewer bytes than the root).
    if len(aliases) == 1 and aliases[0] is not root and dense_perm(aliases[0].meta["val"]) is not None:
        root = aliases[0]
    val = root.meta["val"]
    numel = math.prod(compat.upper_bound(s) for s in val.shape)
    rec = Saved(node=root, aliases=aliases, kind="skip", numel=numel,
                full_bytes=numel * val.element_size(),
                dynamic=any(not isinstance(s, int) for s in val.shape))

    def skip(reason: str) -> Saved:
        rec.reason = reason
        return rec

    if (root.op == "placeholder" and root.name not in activation_inputs) or root in params:
        rec.activation = False
        if root.op == "placeholder":
            return skip("primal" if root in aliases else f"alias of primal %{root.name}")
        return skip("parameter-derived")
    # A graph output that the backward also saves is compressed too. Across DDP's bucket split or a graph
    # break, the next graph takes it and the caller drops it, so the saved copy is what keeps it alive; a
    # caller that keeps it pays the compressed copy (1/16 of fp32 at 2 bits) beside it.
    returned = "returned by the graph too" if any(a in user_outputs for a in aliases) or root in user_outputs else ""
    if any(a.meta.get("saved_tensor_with_no_vc_check") for a in aliases):
        return skip("saved without version check")
    if any(a is not root and not replayable(chains[a][chains[a].index(root):]) for a in aliases if root in chains[a]):
        return skip(f"alias of %{root.name} with symbolic view arguments")
    if root.target is operator.getitem and root.args[1] != 0 and isinstance(root.args[0], fx.Node) \
            and any(p in op_name(root.args[0]) for p in STATISTIC_PRODUCERS):
        return skip(f"statistic of {op_name(root.args[0])}, kept exact")
    if val.dtype == torch.bool:
        if not config.compress_masks:
            return skip("mask compression off")
        kind = "mask"
    elif val.dtype in FLOATS:
        kind = "quant"
    else:
        return skip(f"{str(val.dtype).replace('torch.', '')} kept exact")
    perm = dense_perm(val)
    if perm is None:
        return skip("not dense in memory")
    if rec.full_bytes < config.min_bytes and root.name not in hoisted:
        return skip(f"below payoff ({rec.full_bytes} B < min_bytes {config.min_bytes})")
    if rec.dynamic and kind == "quant":
        # Inductor guards on "more than one group" when it compiles the quantizer, which would recompile at
        # that size, and break a user's mark_dynamic(min=...) range: leave such small-at-minimum tensors alone.
        least = math.prod(compat.lower_bound(s) for s in val.shape)
        if quant.num_groups(least, config.group_size) < 2:
            return skip(f"dynamic size can fall to one group ({least} elements)")
    rec.kind, rec.perm = kind, perm
    rec.consumer, rec.consumer_op = consumer_class(bw, [a.name for a in aliases])
    rec.spread = broadcast_factor(bw, [a.name for a in aliases])
    need = MIN_BITS[rec.consumer] if kind == "quant" else 1
    why = f"read by {rec.consumer_op} in the backward ({rec.consumer}): needs >= {need} bits" if need > 1 else ""
    if rec.consumer == "select":
        rec.kind = "skip"
        return skip(f"read by {rec.consumer_op} in the backward (select): picks elements by value, kept exact")
    if rec.consumer == "exp" and root.op == "placeholder":
        # An earlier graph's activation read by an exponential: the scores of a softmax, which may hold the
        # -inf or finfo.min of an additive mask that the earlier graph added (extreme_values sees only this
        # graph). No group can hold such a value beside finite ones, and exp(x) of the wrong one is silent.
        rec.kind = "skip"
        return skip(f"an earlier graph's activation read by {rec.consumer_op} (exp): may hold a mask's -inf "
                    "from before the graph's start, kept exact")
    if need > max(config.bits):  # no width fine enough: it stays exact
        rec.kind = "skip"
        return skip(f"{why}, bits={list(config.bits)} allow none")
    if len(aliases) > 1 or aliases[0] is not root:
        rec.reason = "root of " + ", ".join("%" + a.name for a in aliases if a is not root)
    elif root.name in hoisted:
        rec.added = True
        rec.reason = f"exact {op_name(root)} of %{root.args[0].name}, moved from the backward"
    spread = f"broadcast x{rec.spread:g} in the backward: weighs as {rec.spread:g}x its elements" if rec.spread > 1 else ""
    rec.reason = "; ".join(filter(None, (rec.reason, why, spread, returned)))
    return rec
