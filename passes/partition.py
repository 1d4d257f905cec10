"""The custom partitioner: Inductor's min-cut partition, then compression of what it saves.

    joint graph ─ keep_saved ─ min_cut_rematerialization_partition ─▶ (fw, bw)   stock; applies
                │                                                                      the recompute budget
                │ (again, with the statistics kept saved, if bw recomputes a normalization's statistics)
                └ recomputed_by_inductor ─▶ recompute_from_saved ─▶ split_kinks ─▶ find_candidates
                  ─▶ hoist_comparisons
                  ─▶ allocate (bits under the session's budget) ─▶ rewrite(fw, bw)
                  ─▶ insert_statistics(bw) (adaptive) ─▶ (fw', bw')

A memory budget that compression cannot meet under actc's default recompute budget runs all of it again at
lower recompute budgets, and the first plan that fits is taken (passes/recompute_budget.recompute_more).

If anything in actc fails, the stock partition is returned and the error is logged once: training
never stops because of actc.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import weakref
from typing import Any

import torch
import torch.fx as fx

from actc import _torch_compat as compat
from actc.kernels import quant
from actc.passes import allocate as alloc
from actc.passes.candidates import (MIN_BITS, SELECT_OPS, Saved, consumer_class, find_candidates, is_statistic,
                                    op_name)
from actc.passes.hoist import find_comparisons, hoist_comparisons, split_kinks
from actc.passes.recompute_budget import (Attempt, backward_at_full_budget, budget_credit, describe, recompute_more,
                                          recomputed_by_inductor)
from actc.passes.remat import recompute_from_saved
from actc.passes.rewrite import Decision, rewrite, trace_pair
from actc.passes.sensitivity import insert_statistics
from actc.plan import GraphPlan, TensorPlan

log = logging.getLogger("actc")


def _source_files() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.abspath(compat.__file__))
    kernels = os.path.dirname(os.path.abspath(quant.__file__))
    files = [os.path.join(d, f) for d in (here, root, kernels) for f in sorted(os.listdir(d)) if f.endswith(".py")]
    return tuple(files)


class ActcPartitioner(compat.CustomPartitionerFn):
    """``torch._inductor.config.custom_partitioner_fn`` for one graph of one actc session."""

    def __init__(self, session, graph=None) -> None:
        # Weak: Inductor keeps a copy of its last config (this object included) after compiling, and a
        # strong reference from there would keep the last session and its graphs alive after
        # torch._dynamo.reset(). The CompiledGraph (which holds the session) is alive while it compiles.
        self._session = weakref.ref(session)
        self._graph = weakref.ref(graph) if graph is not None else None
        self._keep = session if graph is None else None  # no CompiledGraph to hold the session

    @property
    def session(self):
        return self._session()

    @property
    def graph(self):  # the backend's CompiledGraph: where the region found here is recorded
        return self._graph() if self._graph is not None else None

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs: Any):
        needs_grad = _primals_needing_grad(gm, kwargs["num_fwd_outputs"])
        inputs = _activation_primals(gm, self.graph)
        # a recompute budget must never redraw dropout or re-pick a max-pool
        compat.keep_saved(gm, lambda node: op_name(node) in SELECT_OPS)
        at_full = backward_at_full_budget(gm, joint_inputs, kwargs)
        static = self.graph is None or self.graph.static
        lowerable = self.may_recompute_more()

        def partition():
            fw, bw = compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            # nor recompute a normalization's statistics from what actc compresses (a BatchNorm's var_mean)
            if _recomputes_statistics(bw, inputs) and compat.keep_saved(gm, statistic=is_statistic):
                fw, bw = compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            return fw, bw, _graph_key(fw, self.graph)

        def plan_for(fw, bw, key, warn: bool):
            static_indices = kwargs.get("static_lifetime_input_indices")
            by_inductor = [] if at_full is None else \
                recomputed_by_inductor(gm, at_full, bw, fw, static_indices, self.session.config.min_bytes)
            return compress(fw, bw, kwargs["num_fwd_outputs"], static_indices, self.session, key, static,
                            needs_grad, by_inductor, inputs, warn)

        fw, bw, key = partition()
        try:
            created = key not in self.session.regions
            region, plan = plan_for(fw, bw, key, warn=not lowerable)
            if not plan.feasible and lowerable:
                best = recompute_more(self.session, partition, plan_for, Attempt(fw, bw, key, region, plan), created)
                fw, bw, key, region, plan = best.fw, best.bw, best.key, best.region, best.plan
        except Exception as e:  # never break a training step: fall back to the stock partition
            self.session.warn_once(f"actc left a graph uncompressed after an internal error: {type(e).__name__}: {e}")
            log.debug("actc fallback", exc_info=True)
            fw, bw = compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            region = self.session.region(key, [], 0, 0, replannable=False)
            region.forced = None
            plan = GraphPlan(graph=region.index, budget=str(self.session.config.memory_budget),
                             budget_bytes=0, feasible=True, error=f"{type(e).__name__}: {e}",
                             recompute=compat.inductor_recompute_budget())
        if self.graph is not None:
            self.graph.region, self.graph.version = region, region.version
        plan.forward_code, plan.backward_code = fw.code, bw.code
        self.session.add_plan(region, plan)
        return fw, bw

    def may_recompute_more(self) -> bool:
        """May actc lower Inductor's recompute budget for a memory budget that compression alone cannot meet?
        Only when the recompute budget is actc's default: not when the user set ``recompute`` or torch's own
        ``activation_memory_budget`` (``ActcConfig.recompute_is_default``, recorded by the CompiledGraph that
        read torch's setting; without one, nothing did, and the budget in force is kept)."""
        return self.graph is not None and self.graph.recompute_is_default

    def __deepcopy__(self, memo):  # Inductor deep-copies its config; the session must stay shared
        return self

    def __reduce__(self):
        # 2.11, 2.13: the FX-graph and AOTAutograd cache keys pickle Inductor's whole config, this object
        # included (custom_partitioner_fn is not in _cache_config_ignore_prefix). Its weak references do not
        # pickle, and both caches were bypassed on every compile ("unpicklable type ReferenceType"), so a rerun
        # of a script never hit. uuid() is what identifies it; nothing unpickles this outside a cache key.
        return str, (self.uuid(),)

    def uuid(self) -> str:
        # The compile caches must never serve a graph compiled under other options, other actc code, or
        # (absolute budgets, adaptive allocation) another session's plan or statistics buffers.
        region = self.graph.region if self.graph is not None else None
        if self.session is None:  # a stale copy of Inductor's config, after the session was freed
            return compat.get_hash_for_files(_source_files(), "freed session").hex()
        salt = self.session.cache_salt(region)
        recompute = f" recompute budget {compat.inductor_recompute_budget()}"  # the one compile_fx runs under
        return compat.get_hash_for_files(_source_files(), repr(self.session.config) + salt + recompute).hex()


def _recomputes_statistics(bw: fx.GraphModule, activation_primals: frozenset[str]) -> bool:
    """Is a tensor that actc may compress (a saved activation) held to 8 bits only because the backward
    recomputes a normalization's statistics from it (consumer class "stat")? Then saving the statistics
    lets it go to 2 bits. Where another reader already needs 8 bits (an exponential), or the statistics
    are recomputed from the primals (a first LayerNorm over the embeddings), the partition stays as it is."""
    return any(consumer_class(bw, [n.name])[0] == "stat" for n in bw.graph.find_nodes(op="placeholder")
               if not n.name.startswith(("tangents", "primals")) or n.name in activation_primals)


def _primals_needing_grad(joint: fx.GraphModule, num_fwd_outputs: int) -> frozenset[str] | None:
    """Names of the joint graph's primals that get a gradient: the joint graph returns the forward's outputs,
    then one gradient per primal, None where the primal needs none. None if the counts do not line up."""
    outputs = torch.utils._pytree.arg_tree_leaves(*(n.args for n in joint.graph.find_nodes(op="output")))
    grads = outputs[num_fwd_outputs:]
    primals = _primals(joint)
    if len(grads) != len(primals):
        return None
    return frozenset(p.name for p, g in zip(primals, grads) if g is not None)


def _primals(joint: fx.GraphModule) -> list[fx.Node]:
    return [p for p in joint.graph.find_nodes(op="placeholder") if p.name.startswith("primals")]


def _activation_primals(joint: fx.GraphModule, graph) -> frozenset[str]:
    """Names of the joint graph's primals that are activations of an earlier graph (``backend.activation_inputs``).
    AOTAutograd makes one primal per graph input, in order; if the counts, ranks or dtypes do not line up
    (inputs deduplicated, a wrapper in between) none is named, and every input is saved as it is."""
    if graph is None or not graph.activation_inputs:
        return frozenset()
    primals = _primals(joint)
    if len(primals) != len(graph.example_inputs):
        return frozenset()
    names = set()
    for i in graph.activation_inputs:
        val = primals[i].meta.get("val")
        example = graph.example_inputs[i]
        if not isinstance(val, torch.Tensor) or val.dim() != example.dim() or val.dtype != example.dtype:
            return frozenset()
        names.add(primals[i].name)
    return frozenset(names)


def _graph_key(fw: fx.GraphModule, graph) -> str:
    """The same model region compiled again (a recompile) gets the same key, so budgets are not counted twice."""
    ops = ",".join(str(n.target) for n in fw.graph.nodes if n.op == "call_function")
    source = graph.source_key if graph is not None else ""
    return source + ":" + hashlib.sha1(ops.encode()).hexdigest()[:16]


def compress(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, static_indices, session, key: str,
             static: bool = True, needs_grad: frozenset[str] | None = None, by_inductor: list[TensorPlan] = (),
             inputs: frozenset[str] = frozenset(), warn: bool = True):
    """Find, allocate and rewrite; returns the session's region for this graph and its plan. ``by_inductor``:
    rows for what Inductor's recompute budget recomputes (``recomputed_by_inductor``)."""
    config = session.config
    recomputed = recompute_from_saved(fw, bw, num_fwd_outputs, config.min_bytes)
    if config.compress_masks:
        split_kinks(fw, bw)
    records = find_candidates(fw, bw, num_fwd_outputs, static_indices, config, needs_grad=needs_grad,
                              activation_inputs=inputs)
    quants = [r for r in records if r.kind == "quant"]
    cands = [_candidate(r, config, _mask_bytes(fw, bw, r) if config.compress_masks else 0) for r in quants]
    fixed = sum(quant.mask_bytes(r.numel) if r.kind == "mask" else r.full_bytes
                for r in records if r.kind != "quant" and r.activation)
    moved = [_recomputed_plan(node, source) for node, source in recomputed.items()]
    moved += list(by_inductor)
    activation = sum(r.full_bytes for r in records if r.activation) + sum(t.bytes_before for t in moved)
    credit = budget_credit(by_inductor, config)
    region = session.region(key, cands, fixed, activation, replannable=static, credit=credit)
    bits_by_name, feasible, budget = session.plan_bits(region)
    compressed = {a.name for r in quants if bits_by_name[r.name] != r.dtype.itemsize * 8 for a in r.aliases}
    if config.compress_masks and compressed:  # masks the backward recomputes from what is now quantized
        hoisted = hoist_comparisons(fw, bw, num_fwd_outputs, compressed)
        if hoisted:
            records = find_candidates(fw, bw, num_fwd_outputs, static_indices, config, frozenset(hoisted), needs_grad,
                                      inputs)
    if not feasible and warn:
        need = fixed + sum(min(c.bytes_at_bits.values()) for c in cands)
        session.warn_once(f"actc: memory budget {config.memory_budget} ({budget + fixed} B for graph {region.index}) "
                          f"cannot be met even at {min(config.bits)} bit and recompute budget "
                          f"{compat.inductor_recompute_budget():g} (needs {need} B); using the tightest plan")

    decisions, tensors = [], []
    for r in records:
        bits = bits_by_name.get(r.name) if r.kind == "quant" else 1 if r.kind == "mask" else None
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
                if r.name in bits_by_name:
                    bits_by_name = {**bits_by_name, r.name: full_bits}
        tensors.append(_tensor_plan(r, bits, kept, config, cands))
    rewrite(fw, bw, decisions, num_fwd_outputs)
    if config.allocation == "adaptive" and static:
        region.stat_names, region.stat_partial = insert_statistics(bw, decisions, session.id, key)
    region.bits, region.forced = dict(bits_by_name), None
    plan = GraphPlan(graph=region.index, budget=str(config.memory_budget), budget_bytes=budget + fixed,
                     feasible=feasible, tensors=tensors + moved, recompute=compat.inductor_recompute_budget())
    return region, plan


def _recomputed_plan(node: fx.Node, source: str) -> TensorPlan:
    """The plan's row for a tensor that passes/remat.py no longer saves."""
    val = node.meta["val"]
    return TensorPlan(name=node.name, **describe(node), producer=op_name(node), kind="recompute", bits=None,
                      bytes_before=val.numel() * val.element_size(), bytes_after=0,
                      reason=f"recomputed in the backward from %{source} (pointwise)")


def _mask_bytes(fw: fx.GraphModule, bw: fx.GraphModule, r: Saved) -> int:
    """Bytes of the exact masks that compressing ``r`` moves into the forward (passes/hoist.py)."""
    found = find_comparisons(fw, bw, [a.name for a in r.aliases])
    return sum(quant.mask_bytes(math.prod(compat.upper_bound(s) for s in cmps[0].meta["val"].shape))
               for cmps in found.values())


def _candidate(r: Saved, config, mask_bytes: int = 0) -> "alloc.Candidate":
    full_bits = r.dtype.itemsize * 8
    # a compressed width also pays for the masks its compression moves into the forward
    # nonlinear backward consumers (passes/candidates.py) rule out the narrow widths
    sizes = {b: quant.compressed_bytes(r.numel, b, config.group_size, r.dtype) + mask_bytes
             for b in config.bits if b >= MIN_BITS[r.consumer]}
    sizes[full_bits] = r.full_bytes
    # Default sensitivity: every element's rounding noise adds (range^2 / (2^b-1)^2)-proportional variance to
    # the gradient it feeds, so the weight is the element count, times the broadcast factor (one stored
    # element that the backward reads as r.spread elements adds their variance: candidates.broadcast_factor).
    # Adaptive allocation replaces it with the weight measured in the backward (passes/sensitivity.py).
    return alloc.Candidate(id=r.name, bytes_at_bits=sizes, weight=float(r.numel) * r.spread, full_bits=full_bits)


def _tensor_plan(r: Saved, bits, kept: bool, config, cands) -> TensorPlan:
    after = r.full_bytes
    kind, reason = r.kind, r.reason
    if kept:
        kind, reason = "keep", "budget allows full precision"
    elif r.kind == "quant":
        after = quant.compressed_bytes(r.numel, bits, config.group_size, r.dtype)
    elif r.kind == "mask":
        after = quant.mask_bytes(r.numel)
    weight = next((c.weight for c in cands if c.id == r.name), 0.0)
    return TensorPlan(name=r.name, **describe(r.node), producer=r.producer, kind=kind, bits=bits if kind in ("quant", "mask") else None,
                      bytes_before=0 if r.added else r.full_bytes, bytes_after=after, reason=reason, consumer=r.consumer, weight=weight,
                      activation=r.activation)
