"""Inductor's recompute budget, seen from actc: what it recomputes, and lowering it to meet a memory budget.

``backward_at_full_budget`` partitions the joint graph again at budget 1.0, and ``recomputed_by_inductor``
names what the budget in force recomputes instead (the plan's "recompute" rows; an average-bits budget can
credit their share to the saved tensors, ``budget_credit``). ``recompute_more`` is the other direction: a
memory budget that compression alone cannot meet at the recompute budget in force (a fraction or bytes
budget below what 1 bit per element holds) is met by recomputing more, as little more as it needs.
Partitioning and compressing stay with the caller (passes/partition.py), passed in as functions.
``describe`` (a node's shape, dtype and module, for the plan's rows) lives here with the rows it first served.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from actc import _torch_compat as compat
from actc.config import RECOMPUTE_DEFAULT, RECOMPUTE_LEAST, AverageBits
from actc.kernels import quant
from actc.passes import allocate as alloc
from actc.passes.candidates import op_name
from actc.passes.reach import parameter_derived
from actc.plan import GraphPlan, TensorPlan

log = logging.getLogger("actc")


# Recompute budgets tried when the memory budget cannot be met at actc's default (RECOMPUTE_DEFAULT, the only
# one lowered): the first that meets it is taken (the least recompute that does). Never 0: at exactly 0, torch
# 2.13's choose_saved_values_set returns the graph's inputs before it reads the MUST_SAVE tags, so dropout
# would be redrawn in the backward with another mask (_torch_compat.keep_saved); RECOMPUTE_LEAST saves little
# else.
LOWER_RECOMPUTE = (RECOMPUTE_DEFAULT / 2, RECOMPUTE_DEFAULT / 4, RECOMPUTE_DEFAULT / 8, RECOMPUTE_LEAST)


@dataclass
class Attempt:
    """One partition and its plan, at one recompute budget."""
    fw: fx.GraphModule
    bw: fx.GraphModule
    key: str
    region: object  # session.Region
    plan: GraphPlan


def recompute_more(session, partition, plan_for, first: Attempt, created: bool) -> Attempt:
    """A memory budget that compression cannot meet at the recompute budget in force (a fraction or bytes
    budget below what 1 bit per element can hold) is met by recomputing more: partition and compress again at
    each budget of LOWER_RECOMPUTE in turn, and take the first plan that fits, else the last one tried (the
    most recompute). A budget that saves the same tensors as one tried before is skipped (the same plan).
    ``created``: the first attempt's region is new. A plan that is replaced leaves the session before the
    next is made, so that it is neither counted against an absolute budget nor numbered as a graph."""
    start = compat.inductor_recompute_budget()
    best, tried, warned = first, {saved_set(first.bw)}, False
    replaced = first.key if created else None  # a region only this call made
    for budget in LOWER_RECOMPUTE:
        with compat.recompute_budget(budget):
            fw, bw, key = partition()
            saved = saved_set(bw)
            if saved in tried:
                continue
            tried.add(saved)
            if replaced is not None:
                session.regions.pop(replaced, None)
            replaced = key if key not in session.regions else None
            if replaced is None:  # a region of an earlier compile: the plan being replaced is its own
                session.regions[key].bits, session.regions[key].forced = {}, None
            warned = budget == LOWER_RECOMPUTE[-1]  # compress says why, for the last budget
            best = Attempt(fw, bw, key, *plan_for(fw, bw, key, warn=warned))
        if best.plan.feasible:
            log.info("actc: graph %d meets memory budget %s by recomputing more (Inductor's recompute budget %g -> "
                     "%g)", best.region.index, session.config.memory_budget, start, budget)
            return best
    if not warned:
        session.warn_once(f"actc: memory budget {session.config.memory_budget} cannot be met for graph "
                          f"{best.region.index}, even at {min(session.config.bits)} bit and the least recompute "
                          f"budget tried ({LOWER_RECOMPUTE[-1]:g}); using the tightest plan")
    return best


def saved_set(bw: fx.GraphModule) -> frozenset[str]:
    return frozenset(_saved_names(bw))


def _saved_names(bw: fx.GraphModule) -> set[str]:
    return {p.name for p in bw.graph.find_nodes(op="placeholder") if not p.name.startswith("tangents")}


def backward_at_full_budget(gm: fx.GraphModule, joint_inputs, kwargs) -> fx.GraphModule | None:
    """Under a recompute budget below 1, the backward of the stock partition at 1.0 (what Inductor would save
    without the budget), to name what the budget recomputes; None otherwise, or if that partition fails."""
    if compat.inductor_recompute_budget() >= 1.0:
        return None
    try:
        with compat.recompute_budget(1.0):
            return compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)[1]
    except Exception:  # only the plan's rows need it
        log.debug("actc: partition at recompute budget 1.0 failed", exc_info=True)
        return None


def recomputed_by_inductor(joint: fx.GraphModule, at_full: fx.GraphModule, bw: fx.GraphModule, fw: fx.GraphModule,
                           static_indices, min_bytes: int) -> list[TensorPlan]:
    """Plan rows for what Inductor's recompute budget recomputes instead of saving.

    ``at_full`` is the backward of the stock partition at budget 1.0 and ``bw`` the one at the budget in
    force: a tensor saved in the first and not in the second is recomputed in the backward. Activations of
    at least ``min_bytes`` get a row, and the floating ones a share of an average-bits budget
    (``budget_credit``); parameter-derived tensors (a weight's transpose) are not activations."""
    nodes = {n.name: n for n in joint.graph.nodes if n.op == "call_function"}
    params = {n.name for n in parameter_derived(fw, static_indices)}
    rows = []
    for name in sorted(_saved_names(at_full) - _saved_names(bw)):
        node = nodes.get(name)
        val = node.meta.get("val") if node is not None else None
        if not isinstance(val, torch.Tensor) or name in params:
            continue
        nbytes = math.prod(compat.upper_bound(s) for s in val.shape) * val.element_size()
        if nbytes >= max(min_bytes, 1):
            rows.append(TensorPlan(name=name, **describe(node), producer=op_name(node), kind="recompute", bits=None,
                                   bytes_before=nbytes, bytes_after=0,
                                   reason=f"recomputed in the backward by Inductor's partitioner (recompute budget "
                                          f"{compat.inductor_recompute_budget():g})"))
    return rows


def budget_credit(rows: list[TensorPlan], config) -> int:
    """An average-bits budget ("2bit") means the bytes of every compressible tensor at that width. The tensors
    Inductor recomputes are compressible ones it no longer saves: their share stays in the budget and buys
    more bits for the tensors that are saved. Fraction budgets count them in the uncompressed total
    instead, and absolute budgets are bytes whatever is recomputed. ``recompute_credit=False``: no share, the
    budget counts only what is saved."""
    budget = config.memory_budget
    if not isinstance(budget, AverageBits) or not rows or not config.recompute_credit:
        return 0
    cands = []
    for t in rows:
        dtype = getattr(torch, t.dtype)
        if not dtype.is_floating_point:  # masks and indices are not compressible tensors
            continue
        numel = t.bytes_before // dtype.itemsize
        sizes = {b: quant.compressed_bytes(numel, b, config.group_size, dtype) for b in config.bits}
        sizes[dtype.itemsize * 8] = t.bytes_before
        cands.append(alloc.Candidate(id=t.name, bytes_at_bits=sizes, weight=1.0, full_bits=dtype.itemsize * 8))
    return alloc.budget_for_average_bits(cands, budget.bits)


def describe(node: fx.Node) -> dict[str, str]:
    val = node.meta["val"]
    return dict(shape=str(tuple(val.shape)).replace(",)", ")"), dtype=str(val.dtype).replace("torch.", ""),
                module=module_path(node))


def module_path(node: fx.Node) -> str:
    """The innermost module that made ``node`` ("blocks.0.mlp.fc1"), from the ``nn_module_stack`` that dynamo
    records and AOTAutograd copies onto the joint graph; "" for a primal or when it was not recorded.
    Ops that the backward's trace placed in the forward (a transposed activation for a weight gradient)
    carry no stack: they take the module of the nearest input that has one."""
    for _ in range(16):
        stack = node.meta.get("nn_module_stack") or {}
        inputs = [n for n in node.all_input_nodes if n.op != "placeholder"]
        if stack or not inputs:
            break
        node = inputs[0]
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\['self'\]\.?|^L\['[^']*'\]\.?", "", path)    # dynamo's source prefix
    path = re.sub(r"\[(\d+)\]", r".\1", path)                      # h[0] -> h.0
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    return path.strip(".")
