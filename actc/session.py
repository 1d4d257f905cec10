"""A session: the state of one ``torch.compile(..., backend="actc")`` call, shared by every graph it compiles.

    Session ─ regions (one per partitioned forward/backward pair; graph breaks give several)
              ├ candidates: bytes at each width and a sensitivity weight, for the allocator
              ├ bits: what the compiled code stores; forced bits for the next (re)compile after a re-plan
              └ statistics: accumulated in the backward by ``actc::observe`` (passes/sensitivity.py)

The budget is global. Average-bit and fraction budgets are scale-free, so each region takes its own share;
an absolute budget is shared: a region that cannot fit in what the others left triggers one joint solve
over all regions, and the regions whose bits change recompile on their next call.

Adaptive allocation: after ``warmup_steps`` measured backward passes, and every ``replan_every`` after
that, the weights measured in the backward replace the defaults and all regions are solved jointly under
the same budget. Only tensors whose sensitivity is fully measured change bits; the others keep theirs.
The new plan is taken only when it lowers the gradient-variance proxy by more than ``HYSTERESIS`` under
the new weights, so noisy weights do not recompile again and again.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from actc.config import ActcConfig, AverageBits, Bytes, Fraction
from actc.passes import allocate as alloc
from actc.passes.sensitivity import ROUNDING_VARIANCE
from actc.plan import GraphPlan, table, to_json

log = logging.getLogger("actc")
HYSTERESIS = 0.05  # a re-plan must cut the variance proxy by more than 5% under the measured weights
_ids = itertools.count()
# by id, for actc::observe (the compiled backward names its session). Weak: a session lives as long as the
# compiled graphs that hold it, so torch._dynamo.reset() (or a dropped model) frees it.
SESSIONS: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()


@dataclass
class Region:
    """One partitioned graph pair of the model, across the dynamo recompiles that give the same graph."""

    key: str
    index: int
    candidates: list[alloc.Candidate]   # default weights
    fixed: int                          # bytes of activations that stay as they are (or masks)
    activation: int                     # uncompressed bytes of what Inductor would save
    replannable: bool = True            # static shapes: can be recompiled with other bits
    credit: int = 0                     # average-bits budget bytes of what Inductor recomputes instead of saving
    bits: dict[str, int] = field(default_factory=dict)      # what the compiled code uses
    forced: dict[str, int] | None = None                    # bits for the next compile, after a re-plan
    version: int = 0                    # bumped by every re-plan that changes this region's bits
    plan: GraphPlan | None = None
    stat_names: list[str] = field(default_factory=list)     # rows of the statistics, in order
    stat_partial: set[str] = field(default_factory=set)     # rows that measure a part of the sensitivity
    stats: torch.Tensor | None = None   # [n, 3] sums over the window: gradient factor A, range factor R,
    #                                     the consumer's squared gradient norm D (passes/sensitivity.py)
    window: int = 0                     # backward passes accumulated in ``stats``
    observed: int = 0                   # backward passes measured in all

    def observe(self, stats: torch.Tensor) -> None:
        """Called from the compiled backward: add, on the device, with no host sync."""
        stats = stats.detach()
        self.stats = stats.clone() if self.stats is None or self.stats.shape != stats.shape else self.stats.add_(stats)
        self.window += 1
        self.observed += 1

    @property
    def planned(self) -> dict[str, int]:
        """The bits this region has, or will have after its pending recompile."""
        return self.forced if self.forced is not None else self.bits

    def bytes_at(self, bits: dict[str, int]) -> int:
        return self.fixed + sum(c.bytes_at_bits[bits[c.id]] for c in self.candidates)


class Session:
    def __init__(self, config: ActcConfig, options: Any = None) -> None:
        self.config = config
        self.id = next(_ids)
        self.token = uuid.uuid4().hex  # unique across processes, for the compile caches
        self.options = options  # the options dict it was made for (backend.session_for keys on its id)
        SESSIONS[self.id] = self
        self.regions: dict[str, Region] = {}
        self.replans: list[dict] = []
        self.next_replan = config.warmup_steps
        self._warned: set[str] = set()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------ regions
    @property
    def plans(self) -> list[GraphPlan]:
        return [r.plan for r in self.regions.values() if r.plan is not None]

    def region(self, key: str, candidates, fixed: int, activation: int, replannable: bool, credit: int = 0) -> Region:
        with self._lock:
            region = self.regions.get(key)
            if region is None:
                region = self.regions[key] = Region(key, len(self.regions), candidates, fixed, activation, replannable,
                                                    credit=credit)
            else:  # a recompile of the same graph: same candidates, the plan it already has
                region.candidates, region.fixed, region.activation = candidates, fixed, activation
                region.credit = credit
                region.replannable = region.replannable and replannable
            return region

    def budget_for(self, region: Region) -> int:
        """Bytes this region's candidates may use, given what the other regions hold now."""
        budget = self.config.memory_budget
        if isinstance(budget, AverageBits):
            return (alloc.budget_for_average_bits(region.candidates, budget.bits) if region.candidates else 0) \
                + region.credit
        if isinstance(budget, Fraction):
            return int(budget.fraction * region.activation) - region.fixed
        others = sum(r.bytes_at(r.planned) for r in self.regions.values() if r is not region and r.planned)
        return budget.nbytes - others - region.fixed

    def plan_bits(self, region: Region) -> tuple[dict[str, int], bool, int]:
        """Bits for a region about to be compiled: (bits, feasible, budget bytes for its candidates)."""
        with self._lock:
            budget = self.budget_for(region)
            names = {c.id for c in region.candidates}
            if region.planned and set(region.planned) == names:  # re-planned, or a recompile of this graph
                return region.planned, True, budget
            result = self._allocate(region.candidates, budget)
            others = [r for r in self.regions.values() if r is not region and r.planned and r.replannable]
            if not result.feasible and isinstance(self.config.memory_budget, Bytes) and others:
                joint = self.solve(self._weights_default())
                if joint is not None:
                    self._apply(joint, reason=f"graph {region.index} did not fit in what the others left")
                    return joint[region.key], True, self.budget_for(region)
            return result.bits, result.feasible and budget >= 0, budget

    def _allocate(self, candidates, budget: int) -> alloc.Allocation:
        return alloc.allocate(candidates, max(budget, 0), allowed_bits=self.config.bits,
                              allow_full=self.config.keep_uncompressed)

    def total_budget(self) -> int:
        budget, regions = self.config.memory_budget, list(self.regions.values())
        if isinstance(budget, AverageBits):
            return sum((alloc.budget_for_average_bits(r.candidates, budget.bits) if r.candidates else 0) + r.credit
                       for r in regions)
        if isinstance(budget, Fraction):
            return int(budget.fraction * sum(r.activation for r in regions)) - sum(r.fixed for r in regions)
        return budget.nbytes - sum(r.fixed for r in regions)

    def solve(self, weights: dict[str, list[alloc.Candidate]]) -> dict[str, dict[str, int]] | None:
        """One allocation over every region; regions that cannot recompile keep their bits."""
        pinned = [r for r in self.regions.values() if not r.replannable and r.planned]
        free = [r for r in self.regions.values() if r not in pinned]
        budget = self.total_budget() - sum(r.bytes_at(r.planned) - r.fixed for r in pinned)
        joint = [alloc.Candidate(f"{r.index}/{c.id}", c.bytes_at_bits, c.weight, c.full_bits)
                 for r in free for c in weights[r.key]]
        result = self._allocate(joint, budget)
        if not result.feasible:
            return None
        return {r.key: {c.id: result.bits[f"{r.index}/{c.id}"] for c in r.candidates} for r in free}

    def _apply(self, joint: dict[str, dict[str, int]], reason: str) -> list[tuple]:
        changed = []
        for key, bits in joint.items():
            region = self.regions[key]
            diff = [(region.index, name, region.planned.get(name), b) for name, b in bits.items()
                    if region.planned and region.planned.get(name) != b]
            if diff:
                region.forced, region.version = bits, region.version + 1
                changed += diff
        if changed:
            log.info("actc re-plan (%s): %d tensors change bits; their graphs recompile on next use", reason, len(changed))
        return changed

    # ----------------------------------------------------------------------------------------- adaptive
    def measured(self) -> dict[str, list[alloc.Candidate]]:
        """Candidates with the weights measured in the backward (see passes/sensitivity.py).

        weight = A * R (absolute) or A * R / D (relative): A the gradient factor, R the range factor, D the
        consumer's squared gradient norm. Tensors whose consumer has no gradient factor get the largest A
        (A / D) of the fully measured ones, and partly measured ones their A plus that; tensors with
        no measurement at all (kept at full precision, not yet run) keep their default weight (numel) scaled
        by the median measured weight per element.

        Only the fully measured tensors may change bits: the others come back with one choice, the bits
        they have, so their weight is a constant of the proxy. Both fallback factors tried (the median and
        the largest measured one) let re-plans move bits onto or off tensors whose noise path the
        statistic does not see, and on the enwiki LM at 1.5 bits each ended worse than the static plan.
        """
        rows: dict[str, dict[str, tuple[float, float, bool]]] = {}
        relative = self.config.sensitivity == "relative"
        for r in self.regions.values():
            if r.stats is not None and r.window:
                values = (r.stats / r.window).tolist()  # the one host sync, once per re-plan
                own = rows[r.key] = {}
                for name, (a, rng, d) in zip(r.stat_names, values):
                    if relative:  # A / D; -1 (take the largest) where either was not measured
                        a = a / _signal(d, a * rng, r.bits.get(name)) if a >= 0 and d > 0 else -1.0
                    own[name] = (a, rng, name in r.stat_partial)
        full = {(key, name) for key, by_name in rows.items() for name, (a, _, partial) in by_name.items()
                if a >= 0 and not partial}
        grads = [rows[key][name][0] for key, name in full]
        # Unmeasured paths are assumed as sensitive as the most sensitive measured one (a normalization's
        # x̂ enters its dγ and, through dx, every layer upstream). These weights only size the proxy's
        # constant term: the tensors they belong to keep their bits (below, and passes/sensitivity.py).
        a_unmeasured = max(grads) if grads else 1.0
        weights: dict[str, dict[str, float]] = {}
        per_element = []
        for r in self.regions.values():
            own = weights[r.key] = {}
            for c in r.candidates:
                if c.id in rows.get(r.key, {}):
                    a, rng, _ = rows[r.key][c.id]
                    own[c.id] = (max(a, 0.0) + (0.0 if (r.key, c.id) in full else a_unmeasured)) * rng
                    per_element.append(own[c.id] / max(c.weight, 1.0))
        scale = statistics.median(per_element) if per_element else 1.0

        def choices(r: Region, c: alloc.Candidate):
            if (r.key, c.id) in full or c.id not in r.planned:
                return c.bytes_at_bits
            return {r.planned[c.id]: c.bytes_at_bits[r.planned[c.id]]}  # not fully measured: keeps its bits

        return {r.key: [alloc.Candidate(c.id, choices(r, c), weights[r.key].get(c.id, c.weight * scale), c.full_bits)
                        for c in r.candidates] for r in self.regions.values()}

    def _weights_default(self) -> dict[str, list[alloc.Candidate]]:
        return {r.key: r.candidates for r in self.regions.values()}

    def maybe_replan(self) -> None:
        """Re-plan when the measured window is long enough. Called before every compiled forward."""
        if self.config.allocation != "adaptive" or self.next_replan is None:
            return
        if max((r.window for r in self.regions.values()), default=0) < self.next_replan:
            return
        with self._lock:
            self.replan()

    def replan(self) -> dict:
        start = time.perf_counter()
        weights = self.measured()
        objective = lambda bits: sum(alloc.variance(c, bits[r.key][c.id])  # noqa: E731
                                     for r in self.regions.values() for c in weights[r.key] if r.key in bits)
        current = {r.key: r.planned for r in self.regions.values() if r.planned}
        joint = self.solve(weights)
        before = objective(current)
        after = objective({**current, **joint}) if joint is not None else before
        accepted = joint is not None and after < (1 - HYSTERESIS) * before
        changed = self._apply(joint, "measured sensitivities") if accepted else []
        for r in self.regions.values():
            r.stats, r.window = None, 0
        self.next_replan = self.config.replan_every or None
        record = {"replan": len(self.replans), "steps": max((r.observed for r in self.regions.values()), default=0),
                  "accepted": accepted, "objective_before": before, "objective_after": after,
                  "solve_ms": 1000 * (time.perf_counter() - start), "recompile_s": 0.0,
                  "changed": [{"graph": g, "tensor": n, "bits_before": a, "bits_after": b} for g, n, a, b in changed]}
        self.replans.append(record)
        log.info("actc re-plan %d after %d steps: %s, variance proxy %.4g -> %.4g, %d tensors change bits%s",
                 record["replan"], record["steps"], "taken" if accepted else "kept the current plan", before, after,
                 len(changed), "".join(f"\n  graph {g} %{n}: {a} -> {b} bits" for g, n, a, b in changed))
        self._dump_replan(record)
        return record

    def recompiled(self, seconds: float) -> None:
        """A region recompiled with a re-planned allocation: add the time to the last re-plan's cost."""
        if self.replans:
            self.replans[-1]["recompile_s"] += seconds
            self._dump_replan(self.replans[-1])

    # -------------------------------------------------------------------------------------------- report
    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    def add_plan(self, region: Region, plan: GraphPlan) -> None:
        region.plan = plan
        log.info(plan.totals())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("actc plan for graph %d:\n%s", plan.graph, table([plan]))
        if self.config.dump_dir:
            _dump(self.config.dump_dir, plan, suffix=f"_v{region.version}" if region.version else "")

    def _dump_replan(self, record: dict) -> None:
        if self.config.dump_dir:
            os.makedirs(self.config.dump_dir, exist_ok=True)
            with open(os.path.join(self.config.dump_dir, f"replan_{record['replan']:03d}.json"), "w") as f:
                json.dump(record, f, indent=2)

    def cache_salt(self, region: Region | None) -> str:
        """What, besides the options and actc's source, a compiled artifact depends on (see uuid())."""
        shared = isinstance(self.config.memory_budget, Bytes) or self.config.allocation == "adaptive"
        return (f"session {self.token}" if shared else "") + (repr(region.planned) if region else "")


def _dump(directory: str, plan: GraphPlan, suffix: str = "") -> None:
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"graph_{plan.graph:03d}{suffix}")
    with open(stem + "_plan.txt", "w") as f:
        f.write(table([plan]) + "\n")
    with open(stem + "_plan.json", "w") as f:
        f.write(to_json([plan], include_code=False) + "\n")
    with open(stem + "_forward.py", "w") as f:
        f.write(plan.forward_code)
    with open(stem + "_backward.py", "w") as f:
        f.write(plan.backward_code)


def _signal(d: float, noise_weight: float, bits: int | None) -> float:
    """‖dW‖² less the rounding noise it was measured with: D is computed from the dequantized tensor, so
    E[D] = ‖dW‖² + A·R·c/(2^b - 1)² (passes/sensitivity.py). Left in, the noise would make the tensors that
    have few bits look less sensitive than they are. Floored at D/10 where noise would be nearly all of it."""
    if not bits:
        return d
    return max(d - noise_weight * ROUNDING_VARIANCE / ((1 << bits) - 1) ** 2, d / 10)


def observe(session_id: int, key: str, stats: Any) -> None:
    session = SESSIONS.get(session_id)
    region = session.regions.get(key) if session is not None else None
    if region is not None:
        region.observe(stats)
