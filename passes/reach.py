"""What a forward tensor depends on: parameters, inputs that need grad, or extreme constants.

Two walks over the forward graph decide that a saved float tensor must stay exact even though it is large:

    where(pad, 0, -inf) ─ add(scores, ·) ─ sub(·, amax) ─ exp ─ div ─ softmax
          │ {-inf}          │ {-}            │ {-}          └ clean: exp(-inf) = 0, values in [0, 1]
          └ grad_reach: no parameter, no grad input → "not an activation", kept exact
                            └ extreme_values: may hold -inf next to finite logits → kept exact

quant.py gives back ±inf, NaN and the dtype's limits exactly only in groups that hold nothing else (at most
two distinct values), so a tensor that mixes them with ordinary values cannot be compressed. The sign of
the extreme is tracked because the functions that end it are one-sided: exp sends -inf to 0 but +inf to
+inf, so a softmax over masked scores is clean while ``exp(scores + mask)`` with a +inf mask is not.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
POINTWISE = {"add", "sub", "rsub", "mul", "div", "neg", "abs", "where", "clone", "convert_element_type",
             "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "masked_fill", "fill", "full", "full_like",
             "scalar_tensor", "pow", "square", "relu"}
# f(-inf) is finite: exp and its relatives end a negative extreme, a positive one passes.
ENDS_NEGATIVE = {"exp", "exp2", "expm1", "relu", "clamp_min"}
# Bounded outputs: only NaN passes.
BOUNDED = {"sigmoid", "tanh", "erf", "erfc", "atan", "hardtanh", "hardsigmoid", "softmax", "_softmax"}


def op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def is_view(node: fx.Node) -> bool:
    """An aten op whose result aliases its first argument (schema ``Tensor(a)`` or ``Tensor(a)[]``),
    or ``getitem`` of such a list (split, unbind, chunk)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and is_view(node.args[0])
    schema = getattr(node.target, "_schema", None)
    if schema is None or len(schema.returns) != 1:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write and isinstance(node.args[0], fx.Node)


def _static(fw: fx.GraphModule, static_indices: list[int] | None) -> set[fx.Node]:
    placeholders = fw.graph.find_nodes(op="placeholder")
    return {placeholders[i] for i in (static_indices or []) if i < len(placeholders)}


def parameter_derived(fw: fx.GraphModule, static_indices: list[int] | None) -> set[fx.Node]:
    """Nodes computed only from parameters/buffers (static-lifetime primals) and constants."""
    derived = _static(fw, static_indices)
    for node in fw.graph.nodes:
        if node.op == "call_function" and node.all_input_nodes and all(n in derived for n in node.all_input_nodes):
            derived.add(node)
    return derived


def grad_reach(fw: fx.GraphModule, static_indices: list[int] | None, needs_grad: frozenset[str] | None):
    """Forward nodes that depend on a parameter or buffer (static-lifetime primals) or on an input that
    requires grad; None when ``needs_grad`` is unknown.

    A saved float tensor outside this set is no activation of the model: an attention mask built by
    ``where`` from the input's padding, a position table, a constant. It is cheap to keep, it can hold -inf
    or the dtype's minimum, and no gradient flows through it, so it stays exact. (Bool masks are packed
    exactly either way; a frozen trunk's output depends on its parameters and is an activation.)
    """
    if needs_grad is None:
        return None
    reach = _static(fw, static_indices) | {p for p in fw.graph.find_nodes(op="placeholder") if p.name in needs_grad}
    for node in fw.graph.nodes:
        if node.op == "call_function" and any(n in reach for n in node.all_input_nodes):
            reach.add(node)
    return reach


def _signs(c: float) -> frozenset[str]:
    return frozenset({"nan"} if math.isnan(c) else {"+" if c > 0 else "-"})


def _flip(s: frozenset[str]) -> frozenset[str]:
    return frozenset({"+": "-", "-": "+"}.get(x, x) for x in s)


def _propagate(node: fx.Node, name: str, parts: list[tuple[int, frozenset[str]]]) -> frozenset[str]:
    """Signs of the extremes that ``node`` may hold, from those of its arguments ``parts``: (position, signs)."""
    s = frozenset().union(*(p for _, p in parts))
    if name == "neg":
        return _flip(s)
    if name in ("sub", "rsub"):  # the subtracted argument's extremes change sign
        subtracted = 1 if name == "sub" else 0
        s = frozenset().union(*(_flip(p) if i == subtracted else p for i, p in parts))
    elif name in ("mul", "div"):
        others = [a for i, a in enumerate(node.args) if i not in {j for j, _ in parts}]
        if not all(isinstance(a, (int, float)) and a > 0 for a in others):
            s = s | {"+", "-"}  # a factor of unknown sign
    elif name in ("abs", "square", "pow"):
        s = frozenset(x if x == "nan" else "+" for x in s)
    elif name in ENDS_NEGATIVE:
        return s - {"-"}
    elif name not in POINTWISE and s - {"nan"}:  # another pointwise op (log, sin, ...): either sign, or NaN
        s = s | {"+", "-", "nan"}
    if {"+", "-"} <= s and name in ("add", "sub", "rsub"):
        s = s | {"nan"}  # inf - inf
    return s


def extreme_values(fw: fx.GraphModule) -> dict[fx.Node, float]:
    """Forward float nodes that may hold ±inf, NaN or values near their dtype's limits, each with the constant
    that put them there: a scalar argument of that kind (``where(mask, 0, -inf)``, ``full(..., finfo.min)``,
    ``masked_fill``), carried with its sign through views and pointwise ops (``scores + mask``). Reductions,
    matmuls and bounded functions end it, and exp ends a negative one (see the module docstring)."""
    found: dict[fx.Node, tuple[float, frozenset[str]]] = {}
    for node in fw.graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor) or val.dtype not in FLOATS:
            continue
        limit = torch.finfo(val.dtype).max / 2
        scalars: list[float] = []
        torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: scalars.append(a) if isinstance(a, float) else None)
        extreme = [c for c in scalars if not math.isfinite(c) or abs(c) >= limit]
        parts = [(i, found[a][1]) for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in found]
        name = op_name(node)
        signs: frozenset[str] = frozenset()
        if parts and is_view(node):
            signs = parts[0][1]
        elif parts and name in BOUNDED:
            signs = frozenset().union(*(p for _, p in parts)) & {"nan"}
        elif parts and (name in POINTWISE or name in ENDS_NEGATIVE or torch.Tag.pointwise in getattr(node.target, "tags", ())):
            signs = _propagate(node, name, parts)
        signs = signs.union(*(_signs(c) for c in extreme))
        if signs:
            source = extreme[0] if extreme else next(found[a][0] for a in node.args if isinstance(a, fx.Node) and a in found)
            found[node] = (source, signs)
    return {n: c for n, (c, _) in found.items()}
