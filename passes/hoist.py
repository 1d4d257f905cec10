"""Move the backward's comparisons of compressed data into the forward, where they see the exact values.

ReLU's backward is ``where(relu <= 0, 0, grad)``. When the partitioner saves ``relu`` (the next matmul's
weight gradient needs it anyway) it recomputes the mask in the backward from that saved tensor; when it
saves a BatchNorm input instead, it recomputes the whole normalize → ReLU chain there and compares the
result. Once the saved tensor is quantized, a small positive value can round to exactly 0 (or a small
negative one to above 0) and the gradient is dropped or let through wrongly: a bias that no averaging over
steps removes. Computing the comparison in the forward, on the exact value, and saving it as a bool mask
(packed to 1 bit an element later) makes the mask exact again, for 1/32 of the bytes of an fp32 tensor.

Before:
    fw: relu = aten.relu(addmm)                        return (out, relu)
    bw(relu, tangents_1): le = aten.le.Scalar(relu, 0)
                          where = aten.where.self(le, 0.0, mm)
After:
    fw: relu = aten.relu(addmm)
        relu_le = aten.le.Scalar(relu, 0)              return (out, relu, relu_le)
    bw(relu, relu_le, tangents_1): where = aten.where.self(relu_le, 0.0, mm)

A comparison moves when its input depends on a tensor about to be compressed and is either that saved
tensor or a node the partitioner recomputed: such a node keeps its forward name, target and argument names,
which is checked, so the forward node of the same name holds the exact value. A saved tensor that nothing
in the backward reads any more is dropped from both graphs, and so is a recomputation nothing needs. New
masks join the saved tensors after the last version-checked one, in the forward outputs and the backward
placeholders alike, so AOTAutograd's saved-tensor layout stays consistent.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
SPLIT_KINK = "actc_split_kink"  # meta key of a backward relu/clamp that split_kinks rewrote: (target, args)
COMPARISONS = (aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar)
# a kink k(v) = where(compare(v, c), c, v): ReLU is clamp_min at 0, and Hardtanh, ReLU6 and clamp decompose
# into clamp_min then clamp_max
KINKS = {aten.relu.default: aten.le.Scalar, aten.clamp_min.default: aten.le.Scalar,
         aten.clamp_max.default: aten.ge.Scalar}


def split_kinks(fw: fx.GraphModule, bw: fx.GraphModule) -> int:
    """Write each backward ``relu(v)``, ``clamp_min(v, c)`` or ``clamp_max(v, c)`` whose input the forward
    holds as ``where(le(v, c), c, v)`` (``ge`` for clamp_max; c = 0 for ReLU); returns how many. The backward
    recomputes such a kink when activation checkpointing or Inductor's recompute budget replays a block, and
    a weight gradient may read the recomputed value. Were ``v`` rebuilt from compressed data, ``relu(v + e)``
    would be biased, E[relu(z + e)] > relu(z) near 0 (and a clamp near each bound), however many steps
    average it. Split, the comparison moves into the forward as an exact mask (``hoist_comparisons``), and
    ``where(exact mask, c, v + e)`` is linear in the rounding error: unbiased. Where nothing ends up
    compressed, the two forms compute the same values (NaN included; a -0.0 input may come back as +0.0).

    A clamp_max of a split clamp_min(v, lo) with lo < c compares v itself (the same mask, as v >= c > lo):
    Hardtanh's own backward reads le(v, lo) and ge(v, c), so its two masks serve both. ReLU's own backward,
    ``le(relu(v), 0)``, reads the same ``le(v, 0)`` (NaN and -0.0 included); other comparisons keep reading
    the kink, which the forward holds too.

    The node is rewritten in place and keeps its name: the recomputed nodes after it (a residual add, a
    max-pool) then still match their forward twins by name, and ``_same_in_forward`` takes it for the
    forward's kink (SPLIT_KINK keeps the original target and arguments), so comparisons of it move too.

    Before: bw: relu_1 = aten.relu(addmm_1);  le_3 = aten.le.Scalar(relu_1, 0)
                where_2 = aten.where.self(le_3, full, mm);  mm_1 = aten.mm(permute, relu_1)
    After:  bw: le_5 = aten.le.Scalar(addmm_1, 0);  relu_1 = aten.where.ScalarSelf(le_5, 0.0, addmm_1)
                where_2 = aten.where.self(le_5, full, mm);  mm_1 = aten.mm(permute, relu_1)
    """
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    split = 0
    for node in list(bw.graph.nodes):
        if node.op != "call_function" or node.target not in KINKS:
            continue
        v, c = node.args[0], (node.args[1] if len(node.args) > 1 else 0.0)
        val = v.meta.get("val") if isinstance(v, fx.Node) else None
        if (not isinstance(c, (int, float)) or isinstance(c, bool) or not isinstance(val, torch.Tensor)
                or not val.is_floating_point()  # an integer clamp (positions, buckets) reads no compressed data
                or not _same_in_forward(v, fw_nodes, bw_ph)
                or all(user.target in COMPARISONS for user in node.users)):  # read for its mask alone: as it is
            continue
        compare, original = KINKS[node.target], (node.target, tuple(node.args))
        inner = v.meta.get(SPLIT_KINK)
        if compare is aten.ge.Scalar and inner and inner[0] is aten.clamp_min.default and inner[1][1] < c:
            v = inner[1][0]  # clamp_min(u, lo) >= c iff u >= c, as c > lo (NaN: False both)
        with bw.graph.inserting_before(node):
            mask = bw.graph.call_function(compare, (v, c))
        mask.meta["val"] = compare(v.meta["val"], c)
        if node.target is aten.relu.default:
            for user in list(node.users):
                if user.target is aten.le.Scalar and user.args[1] == 0:  # ReLU's backward: relu(v) <= 0 iff v <= 0
                    user.replace_all_uses_with(mask)
                    bw.graph.erase_node(user)
        # in place: the node keeps its name, so the recomputed nodes after it still match their forward twins
        node.target, node.args = aten.where.ScalarSelf, (mask, float(c), node.args[0])
        node.meta[SPLIT_KINK] = original
        split += 1
    if split:
        bw.graph.lint()
        bw.recompile()
    return split


def find_comparisons(fw: fx.GraphModule, bw: fx.GraphModule, names) -> dict[tuple, list[fx.Node]]:
    """The backward comparisons that would move if the saved tensors ``names`` were compressed, grouped
    by what they compute (one mask each): {(target, forward source name, args...): [comparison nodes]}."""
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    tainted = _downstream(bw, [bw_ph[n] for n in names if n in bw_ph])
    found: dict[tuple, list[fx.Node]] = {}
    for n in bw.graph.nodes:
        if n.target in COMPARISONS and n in tainted and _same_in_forward(n.args[0], fw_nodes, bw_ph):
            signature = (n.target, n.args[0].name, tuple(n.args[1:]), tuple(sorted(n.kwargs.items())))
            found.setdefault(signature, []).append(n)
    return found


def hoist_comparisons(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, names: set[str]) -> list[str]:
    """Hoist the comparisons that read the saved tensors named in ``names``; returns the new masks' names."""
    out = fw.graph.find_nodes(op="output")[0]
    outputs = list(out.args[0])
    descs = out.meta.get("desc")
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    found = find_comparisons(fw, bw, names)
    if not found:
        return []

    # insertion slot: after the last saved tensor that is version-checked (those without the check come last)
    saved_end = num_fwd_outputs
    while saved_end < len(outputs) and _is_regular_saved(outputs[saved_end]):
        saved_end += 1
    if saved_end == num_fwd_outputs or outputs[saved_end - 1].name not in bw_ph:
        return []
    cursor_bw = bw_ph[outputs[saved_end - 1].name]
    taken = set(fw_nodes) | {n.name for n in bw.graph.nodes}
    masks = []
    for cmps in found.values():
        cmp, src = cmps[0], fw_nodes[cmps[0].args[0].name]
        name = _fresh(f"{src.name}_{cmp.target.__name__.split('.')[0]}", taken)
        with fw.graph.inserting_after(src):
            mask = fw.graph.call_function(cmp.target, (src, *cmp.args[1:]), dict(cmp.kwargs))
        mask.name = fw.graph._graph_namespace.create_name(name, None)
        mask.meta["val"] = cmp.meta["val"]
        with bw.graph.inserting_after(cursor_bw):
            mask_ph = bw.graph.placeholder(mask.name)
        mask_ph.meta["val"] = cmp.meta["val"]
        assert mask_ph.name == mask.name, (mask_ph.name, mask.name)
        cursor_bw = mask_ph
        outputs.insert(saved_end + len(masks), mask)
        if descs is not None:
            descs.insert(saved_end + len(masks), descs[saved_end - 1])
        masks.append(mask.name)
        for c in cmps:
            c.replace_all_uses_with(mask_ph)
            bw.graph.erase_node(c)

    bw.graph.eliminate_dead_code()  # recomputations that only fed the comparisons
    unread = {n.name for n in outputs[num_fwd_outputs:] if isinstance(n, fx.Node) and n.name in names
              and n.name in bw_ph and not bw_ph[n.name].users}
    for name in unread:
        bw.graph.erase_node(bw_ph[name])
    out.args = (tuple(outputs),)
    drop_saved_outputs(out, num_fwd_outputs, unread)
    fw.graph.lint()
    bw.graph.lint()
    fw.recompile()
    bw.recompile()
    return masks


def _downstream(graph_module: fx.GraphModule, sources: list[fx.Node]) -> set[fx.Node]:
    seen, frontier = set(sources), list(sources)
    while frontier:
        for user in frontier.pop().users:
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return seen


def _same_in_forward(node, fw_nodes: dict, bw_ph: dict) -> bool:
    """Does the forward hold this exact value under the same name? A saved tensor (a backward placeholder)
    does; a recomputed node does when the forward node of its name has the same target and arguments."""
    if not isinstance(node, fx.Node) or node.name not in fw_nodes:
        return False
    if node.op == "placeholder":
        return node.name in bw_ph
    twin = fw_nodes[node.name]
    names = lambda args: [a.name if isinstance(a, fx.Node) else a for a in args]  # noqa: E731
    if node.meta.get(SPLIT_KINK):  # where(v <= c, c, v): the forward's relu, clamp_min or clamp_max
        target, args = node.meta[SPLIT_KINK]
        return twin.target is target and names(args) == names(twin.args)
    if node.op != "call_function" or twin.op != "call_function" or twin.target is not node.target:
        return False
    return names(node.args) == names(twin.args) and node.kwargs.keys() == twin.kwargs.keys()


def _is_regular_saved(node) -> bool:
    return (isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)
            and not node.meta.get("saved_tensor_with_no_vc_check"))


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def drop_saved_outputs(out: fx.Node, num_fwd_outputs: int, names: set[str]) -> None:
    """Remove the saved tensors ``names`` from the forward's outputs (the caller removed their backward
    placeholders), keeping ``meta["desc"]`` in step."""
    outputs, descs = list(out.args[0]), out.meta.get("desc")
    for i in range(len(outputs) - 1, num_fwd_outputs - 1, -1):
        if isinstance(outputs[i], fx.Node) and outputs[i].name in names:
            del outputs[i]
            if descs is not None:
                del descs[i]
    out.args = (tuple(outputs),)
    renumber_saved_descs(out, num_fwd_outputs)


def renumber_saved_descs(out: fx.Node, num_fwd_outputs: int) -> None:
    """Rebuild ``meta["desc"]`` of the forward's output node after saved outputs were added or removed.

    torch 2.11, 2.13: one AOTOutput descriptor per output; saved tensors and SymInts carry their index.
    """
    descs = out.meta.get("desc")
    if descs is None:
        return
    from actc._torch_compat import SavedForBackwardsAOTOutput

    outputs = out.args[0]
    saved = []
    for i, node in enumerate(outputs[num_fwd_outputs:]):
        old = descs[num_fwd_outputs + i] if num_fwd_outputs + i < len(descs) else None
        if old is not None and hasattr(old, "idx"):
            saved.append(type(old)(i))
        elif SavedForBackwardsAOTOutput is not None:
            saved.append(SavedForBackwardsAOTOutput(i))
        else:
            saved.append(old)
    out.meta["desc"] = list(descs[:num_fwd_outputs]) + saved
