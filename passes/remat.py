"""Recompute in the backward a saved tensor that only matmuls read there, from another saved tensor.

Linear → GELU → Linear saves the first matmul's output ``addmm`` (GELU's backward reads it) and the GELU
output ``mul_2`` (the second Linear's weight gradient reads it). Compressed, ``addmm`` is dequantized inside
the GELU-backward kernel, but ``mul_2``'s only backward reader is a matmul, an extern call, so its
dequantize would be a kernel of its own. ``mul_2`` is a pointwise function of ``addmm``: recomputing it in
the backward from the dequantized ``addmm``, in the kernel that reads it anyway, saves that kernel and all
of ``mul_2``'s bytes.

Before:
    fw: mul = aten.mul(addmm, 0.5); ...; mul_2 = aten.mul(mul, add)      return (out, addmm, mul_2)
    bw(addmm, mul_2, tangents_1): mm = aten.mm(permute_1, mul_2)
After:
    fw: (the same nodes)                                                 return (out, addmm)
    bw(addmm, tangents_1): mul_5 = aten.mul(addmm, 0.5); ...; mul_7 = aten.mul(mul_5, add_3)
                           mm = aten.mm(permute_1, mul_7)

A saved tensor T moves when
  1. only matmul or convolution operands read it in the backward (through views);
  2. the forward computes it from one other saved tensor S of its shape, with at most MAX_CHAIN ops of
     POINTWISE (elementwise ops and reshapes) and no other tensor;
  3. something other than a matmul or convolution reads S in the backward, so a generated kernel reads
     it there anyway;
  4. T has at least ``min_bytes``, and a static shape.
The recomputed ops read S in the backward, where passes/candidates.consumer_class sees them: GELU's erf puts
S in the smooth class (>= 4 bits), as GELU's own backward already does. The weight gradient then sees T's
error as f'(S)·e_S, at S's step, instead of T's own rounding error at T's step.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from actc.passes.candidates import LINEAR_CONSUMERS, is_view, op_name
from actc.passes.hoist import drop_saved_outputs
from actc.passes.rewrite import node_order

POINTWISE = {"add", "sub", "rsub", "mul", "div", "neg", "erf", "tanh", "sigmoid", "exp", "pow",
             "convert_element_type", "view", "_unsafe_view", "reshape"}  # reshapes: a 3-d GELU between 2-d matmuls
MAX_CHAIN = 16


def recompute_from_saved(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int,
                         min_bytes: int) -> dict[fx.Node, str]:
    """Move every saved tensor that qualifies (see the module docstring) into the backward as a recompute;
    returns {moved tensor's forward node: the name of the saved tensor it is recomputed from}."""
    out = fw.graph.find_nodes(op="output")[0]
    outputs = list(out.args[0])
    bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    saved = {n.name: n for n in outputs[num_fwd_outputs:] if isinstance(n, fx.Node) and n.name in bw_ph}
    moved: dict[fx.Node, str] = {}
    for t in list(saved.values()):
        val = t.meta.get("val")
        if t.name in moved.values() or not isinstance(val, torch.Tensor) or not val.is_floating_point():
            continue
        if not all(isinstance(d, int) for d in val.shape):  # dynamic shapes: left to the partitioner
            continue
        if val.numel() * val.element_size() < min_bytes or not _extern_only(bw_ph[t.name]):
            continue
        chain, source = _pointwise_chain(t, saved)
        if source is None or source in moved or _extern_only(bw_ph[source.name]):
            continue
        env = {source: bw_ph[source.name]}
        with bw.graph.inserting_before(min(bw_ph[t.name].users, key=node_order(bw))):
            for node in chain:
                env[node] = bw.graph.node_copy(node, lambda a: env[a])
        bw_ph[t.name].replace_all_uses_with(env[t])
        bw.graph.erase_node(bw_ph[t.name])
        _sink(bw, [env[n] for n in chain])
        moved[t] = source.name
    if not moved:
        return moved
    drop_saved_outputs(out, num_fwd_outputs, {t.name for t in moved})
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
    return moved


def _pointwise_chain(t: fx.Node, saved: dict[str, fx.Node]) -> tuple[list[fx.Node], fx.Node | None]:
    """The forward ops that compute ``t`` from a single other saved tensor, in graph order, and that tensor;
    ([], None) when ``t`` is not such a function."""
    chain, source, stack, seen = [], None, [t], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node is not t and node.name in saved:
            if source is not None and source is not node:
                return [], None
            source = node
            continue
        if node.op != "call_function" or op_name(node) not in POINTWISE or len(chain) >= MAX_CHAIN:
            return [], None
        for arg in node.all_input_nodes:
            if not isinstance(arg.meta.get("val"), torch.Tensor):
                return [], None
            stack.append(arg)
        chain.append(node)
    if source is None or source.meta["val"].shape != t.meta["val"].shape:
        return [], None
    position = {n: i for i, n in enumerate(t.graph.nodes)}
    return sorted(chain, key=position.__getitem__), source


def _sink(bw: fx.GraphModule, recomputed: list[fx.Node]) -> None:
    """Move the recompute and everything computed from it (the weight-gradient matmul) to the end of the
    backward, when only the graph's output reads the result. In place, the matmul splits the graph between
    kernels Inductor would otherwise fuse (on CPU, GELU's backward with the output bias's gradient sum)."""
    out = bw.graph.find_nodes(op="output")[0]
    moving, frontier = set(recomputed), [recomputed[-1]]
    while frontier:
        for user in frontier.pop().users:
            if user is not out and user not in moving:
                moving.add(user)
                frontier.append(user)
    if any(u is not out and u not in moving for n in moving for u in n.users):
        return
    for node in [n for n in bw.graph.nodes if n in moving]:
        out.prepend(node)


def _extern_only(node: fx.Node) -> bool:
    """Do only matmul or convolution operands read ``node`` (through views)?"""
    users = list(node.users)
    if not users:
        return False
    for user in users:
        if is_view(user):
            if not _extern_only(user):
                return False
        elif user.op != "call_function" or op_name(user) not in LINEAR_CONSUMERS:
            return False
    return True
