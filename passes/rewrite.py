"""Graph surgery: quantize saved tensors in the forward, dequantize them in the backward.

Before (forward / backward, after Inductor's partitioner):

    fw: addmm = aten.addmm(b, x, w_t)                bw(primals_3, addmm, gt, tangents_1):
        gelu = ...(addmm)                                 ... = aten.mul(addmm, ...)
        return (out, addmm, gt)

After (2-bit codes for addmm, 1-bit pack for the bool mask gt, per-group (lo, scale) in bf16):

    fw: seeds = actc.seeds(1, cpu, [])               bw(addmm_codes, addmm_meta, gt_bits, tangents_1):
        addmm = aten.addmm(b, x, w_t)                     addmm = <dequantize(addmm_codes, addmm_meta)>
        <quantize(addmm, seeds[0]): amin/amax, hash        gt = <unpack(gt_bits)>
         noise, floor, shift-or packing, inlined aten ops>
        gelu = ...(addmm)                                 ... = aten.mul(addmm, ...)
        return (out, addmm_codes, addmm_meta, gt_bits)

The forward outputs and the backward placeholders change together, position for position: saved tensors
keep their relative order, new SymInts (sizes of dynamic dims the dequantize needs) go after the
existing ones in both graphs. Every inserted node carries ``meta["val"]``. The rounding noise is a hash of
the element index (kernels/noise.py), keyed by one seed per quantized tensor; ``actc::seeds`` draws them
from torch's generator after the graph's own seeds (dropout's), so results follow ``torch.manual_seed``
and the dropout masks are Inductor's.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from actc import _torch_compat as compat
from actc.kernels import quant
from actc.passes.candidates import Saved, alias_chain
from actc.passes.hoist import renumber_saved_descs


@dataclass
class Decision:
    saved: Saved
    bits: int          # 1 for masks
    group: int
    quantize_gm: fx.GraphModule | None = None     # filled by trace_pair
    dequantize_gm: fx.GraphModule | None = None
    bw_parts: list[fx.Node] | None = None          # filled by rewrite: the backward's placeholders (codes, meta)
    bw_values: list[fx.Node] | None = None         # and the restored tensor with its replayed views


def rewrite(fw: fx.GraphModule, bw: fx.GraphModule, decisions: list[Decision], num_fwd_outputs: int) -> None:
    """Apply every decision to the pair of graphs, in place."""
    if not decisions:
        return
    out = fw.graph.find_nodes(op="output")[0]
    outputs = list(out.args[0])
    descs = out.meta.get("desc")
    bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    fw_syms = [n for n in outputs[num_fwd_outputs:] if _is_sym(n)]
    sym_bw: dict = {compat.sym_expr(n.meta["val"]): bw_ph[n.name] for n in fw_syms if n.name in bw_ph}
    sym_anchor = bw_ph[fw_syms[-1].name] if fw_syms and fw_syms[-1].name in bw_ph else None
    new_syms: list[fx.Node] = []
    for d in decisions:
        if d.quantize_gm is None:
            trace_pair(d)
    seed_of = _insert_seeds(fw, [d for d in decisions if d.saved.kind != "mask"])
    order = node_order(fw)  # of the roots and seeds, which the loop below only inserts after

    for d in decisions:
        root, aliases = d.saved.node, d.saved.aliases
        fw_parts = _insert_quantize(fw, root, d, seed_of.get(id(d)), order)
        # sizes the backward needs to rebuild a dynamic shape, shared across tensors
        dims = []
        for i, size in enumerate(root.meta["val"].shape):
            if isinstance(size, int):
                dims.append(size)
                continue
            expr = compat.sym_expr(size)
            if expr not in sym_bw:
                with fw.graph.inserting_before(_first_after(order, root)):
                    fw_sym = fw.graph.call_function(torch.ops.aten.sym_size.int, (root, i))
                fw_sym.meta["val"] = size
                new_syms.append(fw_sym)
                first = bw.graph.find_nodes(op="placeholder")[0]
                ctx = bw.graph.inserting_after(sym_anchor) if sym_anchor is not None else bw.graph.inserting_before(first)
                with ctx:
                    ph = bw.graph.placeholder(f"{fw_sym.name}_{root.name}")
                ph.meta["val"] = size
                sym_bw[expr] = sym_anchor = ph
            dims.append(sym_bw[expr])

        # forward outputs: the first alias's slot takes the compressed parts, the other aliases go
        slots = [i for i, n in enumerate(outputs) if i >= num_fwd_outputs and n in aliases]
        old_ph = [bw_ph[outputs[i].name] for i in slots]
        for i in reversed(slots[1:]):
            del outputs[i]
            if descs is not None:
                del descs[i]
        outputs[slots[0]:slots[0] + 1] = fw_parts
        if descs is not None:
            descs[slots[0]:slots[0] + 1] = [descs[slots[0]]] * len(fw_parts)

        # backward placeholders in the same slot, then the dequantize before the first reader
        with bw.graph.inserting_before(old_ph[0]):
            parts = [bw.graph.placeholder(p.name) for p in fw_parts]
        for ph, p in zip(parts, fw_parts):
            ph.meta["val"] = p.meta["val"]
        first_user = min((u for p in old_ph for u in p.users), key=node_order(bw), default=None)
        anchor = first_user if first_user is not None else bw.graph.find_nodes(op="output")[0]
        restored = _insert_dequantize(bw, anchor, parts, dims, d)
        d.bw_parts, d.bw_values = parts, [restored]
        for alias, ph in zip(_aliases_in_slot_order(aliases, old_ph), old_ph):
            value = _replay_views(bw, anchor, root, alias, restored)
            ph.replace_all_uses_with(value)
            bw.graph.erase_node(ph)
            if value is not restored:
                d.bw_values.append(value)

    outputs.extend(new_syms)
    out.args = (tuple(outputs),)
    renumber_saved_descs(out, num_fwd_outputs)
    fw.graph.eliminate_dead_code()
    for node in bw.graph.nodes:
        if node.op == "call_function":
            node.meta.setdefault("autograd_backward", True)
    fw.graph.lint()
    bw.graph.lint()
    fw.recompile()
    bw.recompile()


def _is_sym(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool, torch.SymFloat))


def node_order(graph_module: fx.GraphModule):
    index = {n: i for i, n in enumerate(graph_module.graph.nodes)}
    return lambda n: index[n]


def _aliases_in_slot_order(aliases, old_ph):
    by_name = {a.name: a for a in aliases}
    return [by_name[p.name] for p in old_ph]


def inline(graph: fx.Graph, before: fx.Node, traced: fx.GraphModule, args: list) -> list[fx.Node]:
    """Copy ``traced`` into ``graph`` before ``before``, its placeholders bound to ``args``."""
    env: dict[fx.Node, object] = {}
    placeholders = traced.graph.find_nodes(op="placeholder")
    for ph, arg in zip(placeholders, args):
        env[ph] = arg
    result = None
    with graph.inserting_before(before):
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
                break
            new = graph.node_copy(node, lambda n: env[n])
            new.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
            env[node] = new
    return list(result) if isinstance(result, (list, tuple)) else [result]


def trace_pair(d: Decision) -> None:
    """Trace the decision's quantize and dequantize on fake values; raises if actc cannot handle the tensor.

    Called before any graph is touched, so that a tensor that fails here is simply left uncompressed.
    """
    val = d.saved.node.meta["val"]
    perm, dtype, kind = d.saved.perm, val.dtype, d.saved.kind
    shape = list(val.shape)
    sym_positions = [i for i, s in enumerate(shape) if not isinstance(s, int)]

    def quantize(x, *seed):  # masks take no seed
        flat = quant.flatten_in_memory_order(x, perm)
        if kind == "mask":
            return (quant.pack_mask(flat),)
        return quant.quantize(flat, d.bits, d.group, seed=seed[0], triton=compat.uses_triton(val.device))

    def dequantize(*args):
        n_parts = 1 if kind == "mask" else 2
        tensors, syms = args[:n_parts], args[n_parts:]
        size = list(shape)
        for i, s in zip(sym_positions, syms):
            size[i] = s
        numel = math.prod(size)
        if kind == "mask":
            flat = quant.unpack_mask(tensors[0], numel)
        else:
            flat = quant.dequantize(tensors[0], tensors[1], d.bits, numel, dtype)
        return quant.restore_layout(flat, size, perm)

    seed = [] if kind == "mask" else [compat.fake_like(val, (), torch.int64)]
    d.quantize_gm = compat.trace(quantize, val, *seed)
    parts = [n.meta["val"] for n in d.quantize_gm.graph.find_nodes(op="output")[0].args[0]]
    d.dequantize_gm = compat.trace(dequantize, *parts, *[shape[i] for i in sym_positions])
    restored = d.dequantize_gm.graph.find_nodes(op="output")[0].args[0].meta["val"]
    if tuple(restored.shape) != tuple(val.shape) or restored.dtype != dtype or \
            any(compat.hint(a) != compat.hint(b) for a, b in zip(restored.stride(), val.stride())):
        raise ValueError(f"dequantize gives {tuple(restored.shape)}/{restored.stride()}, expected {tuple(val.shape)}/{val.stride()}")


def _insert_seeds(fw: fx.GraphModule, decisions: list[Decision]) -> dict[int, fx.Node]:
    """One ``actc::seeds`` call per device, drawing right after the graph's own seeds: {id(decision): its seed}."""
    by_device: dict[torch.device, list[Decision]] = {}
    for d in decisions:
        by_device.setdefault(d.saved.node.meta["val"].device, []).append(d)
    seed_of = {}
    anchor = compat.after_graph_seeds(fw)
    after = compat.graph_seeds(fw)  # a data dependency: each call draws after them (see quant.seeds)
    for device, group in by_device.items():  # each device's call after the previous one's seeds
        with fw.graph.inserting_after(anchor):
            call = fw.graph.call_function(torch.ops.actc.seeds.default, (len(group), device, after))
        vals = [compat.fake_like(d.saved.node.meta["val"], (), torch.int64) for d in group]
        call.meta["val"] = vals
        anchor = call
        for i, (d, val) in enumerate(zip(group, vals)):
            with fw.graph.inserting_after(anchor):
                anchor = seed_of[id(d)] = fw.graph.call_function(operator.getitem, (call, i))
            anchor.meta["val"] = val
        after = [seed_of[id(group[0])]]
    return seed_of


def _insert_quantize(fw: fx.GraphModule, root: fx.Node, d: Decision, seed: fx.Node | None, order) -> list[fx.Node]:
    suffixes = ["bits"] if d.saved.kind == "mask" else ["codes", "meta"]
    args = [root] if seed is None else [root, seed]
    # After the convolutions that read the tensor: Inductor lowers in graph order, and the quantizer's flat
    # view would freeze a buffer whose layout is still open as contiguous, where a convolution lowered first
    # makes it channels-last (Inductor's layout optimization). The conv then needs no layout copy of its
    # input; the quantizer reads the buffer with strides (ConvNet's max-pool output, tests/test_passes.py)
    convs = [u for u in root.users if u.target is torch.ops.aten.convolution.default]
    parts = inline(fw.graph, _first_after(order, *args, *convs), d.quantize_gm, args)
    for part, suffix in zip(parts, suffixes):
        part.name = fw.graph._graph_namespace.create_name(f"{root.name}_{suffix}", None)
    return parts


def _first_after(order, *nodes: fx.Node) -> fx.Node:
    """Where code that reads ``nodes`` goes: after the last of them (``order``: ``node_order`` of their
    graph), and after the placeholders (a saved graph input is compressed too, with a seed drawn after it)."""
    node = max(nodes, key=order).next
    while node.op == "placeholder":
        node = node.next
    return node


def _insert_dequantize(bw: fx.GraphModule, before: fx.Node, parts: list[fx.Node], dims: list, d: Decision) -> fx.Node:
    sym_nodes = [s for s in dims if not isinstance(s, int)]
    (restored,) = inline(bw.graph, before, d.dequantize_gm, [*parts, *sym_nodes])
    return restored


def _replay_views(bw: fx.GraphModule, before: fx.Node, root: fx.Node, alias: fx.Node, restored: fx.Node) -> fx.Node:
    """Rebuild ``alias`` (a chain of views of ``root`` in the forward) from the restored root."""
    if alias is root:
        return restored
    chain = alias_chain(alias)
    chain = chain[chain.index(root):]
    env = {root: restored}
    with bw.graph.inserting_before(before):
        for view in chain[1:]:
            new = bw.graph.node_copy(view, lambda n: env[n])
            new.meta = {"val": view.meta["val"]}
            env[view] = new
    return env[chain[-1]]
