"""The custom partitioner: Inductor's min-cut partition, then compression of what it saves.

    joint graph ─ min_cut_rematerialization_partition ─▶ (fw, bw)        stock; applies activation_memory_budget
                └ find_candidates ─▶ allocate (bits under the budget) ─▶ rewrite(fw, bw) ─▶ (fw', bw')

If anything in actc fails, the stock partition is returned and the error is logged once: training
never stops because of actc.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch.fx as fx

from actc import _torch_compat as compat
from actc.config import AverageBits, Bytes, Fraction
from actc.kernels import quant
from actc.passes import allocate as alloc
from actc.passes.candidates import Saved, find_candidates
from actc.passes.rewrite import Decision, rewrite, trace_pair
from actc.plan import GraphPlan, TensorPlan

log = logging.getLogger("actc")


def _source_files() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.abspath(compat.__file__))
    kernels = os.path.dirname(os.path.abspath(quant.__file__))
    files = [os.path.join(d, f) for d in (here, root, kernels) for f in sorted(os.listdir(d)) if f.endswith(".py")]
    return tuple(files)


class ActcPartitioner(compat.CustomPartitionerFn):
    """``torch._inductor.config.custom_partitioner_fn`` for one actc session (one torch.compile call)."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs: Any):
        fw, bw = compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        key = _graph_key(fw)
        try:
            plan = compress(fw, bw, kwargs["num_fwd_outputs"], kwargs.get("static_lifetime_input_indices"),
                            self.session, key)
        except Exception as e:  # never break a training step: fall back to the stock partition
            self.session.warn_once(f"actc left a graph uncompressed after an internal error: {type(e).__name__}: {e}")
            log.debug("actc fallback", exc_info=True)
            fw, bw = compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            plan = GraphPlan(graph=len(self.session.plans), budget=str(self.session.config.memory_budget),
                             budget_bytes=0, feasible=True, error=f"{type(e).__name__}: {e}")
        plan.forward_code, plan.backward_code = fw.code, bw.code
        self.session.add_plan(plan, key)
        return fw, bw

    def __deepcopy__(self, memo):  # Inductor deep-copies its config; the session must stay shared
        return self

    def uuid(self) -> str:
        # The FX graph cache must never serve a graph compiled under other options or other actc code.
        return compat.get_hash_for_files(_source_files(), repr(self.session.config)).hex()


def _graph_key(fw: fx.GraphModule) -> str:
    """The same model region compiled again (a recompile) gets the same key, so budgets are not counted twice."""
    ops = ",".join(str(n.target) for n in fw.graph.nodes if n.op == "call_function")
    return hashlib.sha1(ops.encode()).hexdigest()[:16]


def compress(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, static_indices, session, key: str) -> GraphPlan:
    config = session.config
    records = find_candidates(fw, bw, num_fwd_outputs, static_indices, config)
    quants = [r for r in records if r.kind == "quant"]
    cands = [_candidate(r, config) for r in quants]
    fixed = sum(quant.mask_bytes(r.numel) if r.kind == "mask" else r.full_bytes
                for r in records if r.kind != "quant" and r.activation)
    budget = _budget_bytes(config.memory_budget, cands, records, fixed, session, key)
    result = alloc.allocate(cands, max(budget, 0), allowed_bits=config.bits, allow_full=config.keep_uncompressed)
    feasible = result.feasible and budget >= 0
    if not feasible:
        need = fixed + sum(min(c.bytes_at_bits[b] for b in config.bits if b in c.bytes_at_bits) for c in cands)
        session.warn_once(f"actc: memory budget {config.memory_budget} ({budget + fixed} B for graph {len(session.plans)}) "
                          f"cannot be met even at {min(config.bits)} bit (needs {need} B); using the tightest plan")

    decisions, tensors = [], []
    for r in records:
        bits = result.bits.get(r.name) if r.kind == "quant" else 1 if r.kind == "mask" else None
        full_bits = r.dtype.itemsize * 8
        kept = r.kind == "quant" and bits == full_bits
        if r.kind in ("quant", "mask") and not kept:
            decision = Decision(saved=r, bits=bits, group=config.group_size)
            try:
                trace_pair(decision)
                decisions.append(decision)
            except Exception as e:  # this tensor stays as it is; the rest of the graph is still compressed
                session.warn_once(f"actc left %{r.name} ({r.producer}) uncompressed: {type(e).__name__}: {e}")
                r.kind, r.reason = "skip", f"not handled: {type(e).__name__}"
        tensors.append(_tensor_plan(r, bits, kept, config, cands))
    rewrite(fw, bw, decisions, num_fwd_outputs)
    plan = GraphPlan(graph=len(session.plans), budget=str(config.memory_budget), budget_bytes=budget + fixed,
                     feasible=feasible, tensors=tensors)
    session.charge(key, plan.bytes_after)
    return plan


def _candidate(r: Saved, config) -> "alloc.Candidate":
    full_bits = r.dtype.itemsize * 8
    sizes = {b: quant.compressed_bytes(r.numel, b, config.group_size, r.dtype) for b in config.bits}
    sizes[full_bits] = r.full_bytes
    # Default sensitivity: every element's rounding noise adds (range^2 / (2^b-1)^2)-proportional variance to
    # the gradient it feeds, so the weight is the element count. Measured weights replace it (a later pass).
    return alloc.Candidate(id=r.name, bytes_at_bits=sizes, weight=float(r.numel), full_bits=full_bits)


def _budget_bytes(budget, cands, records, fixed, session, key) -> int:
    """Bytes the allocator may give the quantizable tensors of this graph."""
    if isinstance(budget, AverageBits):
        return alloc.budget_for_average_bits(cands, budget.bits) if cands else 0
    if isinstance(budget, Fraction):
        return int(budget.fraction * sum(r.full_bytes for r in records if r.activation)) - fixed
    assert isinstance(budget, Bytes)
    return budget.nbytes - session.charged_elsewhere(key) - fixed


def _tensor_plan(r: Saved, bits, kept: bool, config, cands) -> TensorPlan:
    val = r.node.meta["val"]
    after = r.full_bytes
    kind, reason = r.kind, r.reason
    if kept:
        kind, reason = "keep", "budget allows full precision"
    elif r.kind == "quant":
        after = quant.compressed_bytes(r.numel, bits, config.group_size, r.dtype)
    elif r.kind == "mask":
        after = quant.mask_bytes(r.numel)
    weight = next((c.weight for c in cands if c.id == r.name), 0.0)
    return TensorPlan(name=r.name, shape=str(tuple(val.shape)).replace(",)", ")"), dtype=str(val.dtype).replace("torch.", ""),
                      producer=r.producer, kind=kind, bits=bits if kind in ("quant", "mask") else None,
                      bytes_before=r.full_bytes, bytes_after=after, reason=reason, consumer=r.consumer, weight=weight,
                      activation=r.activation)
