"""Tests for actc.passes.allocate: pure Python, no torch."""
from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from actc.passes.allocate import (
    Allocation,
    Candidate,
    allocate,
    budget_for_average_bits,
    full_bytes,
    variance,
)

BITS = (1, 2, 4, 8)


def make(cid: str, numel: int, weight: float | None = None, full_bits: int = 32) -> Candidate:
    """Realistic sizes: group 128 with two bf16 values (4 bytes) of metadata per group."""
    meta = 4 * math.ceil(numel / 128)
    table = {b: math.ceil(numel * b / 8) + meta for b in BITS}
    table[full_bits] = numel * full_bits // 8
    return Candidate(cid, table, float(numel) if weight is None else weight, full_bits)


def random_candidates(rng: random.Random, n: int) -> list[Candidate]:
    out = []
    for i in range(n):
        numel = int(2 ** rng.uniform(0, 20))  # 1 .. 1M elements, tiny ones make full < 8 bit
        weight = 0.0 if rng.random() < 0.1 else numel * 10 ** rng.uniform(-3, 3)
        out.append(make(f"t{i}", numel, weight, rng.choice((16, 32))))
    return out


def random_budget(rng: random.Random, cands: list[Candidate]) -> int:
    lo = allocate(cands, 0).total_bytes  # the tightest plan
    return rng.randint(lo, int(full_bytes(cands) * 1.05) + 1)


def choices(c: Candidate) -> list[int]:
    return sorted(c.bytes_at_bits)


def brute_force(cands: list[Candidate], budget: int) -> float:
    best = math.inf
    for combo in itertools.product(*(choices(c) for c in cands)):
        if sum(c.bytes_at_bits[b] for c, b in zip(cands, combo)) <= budget:
            best = min(best, math.fsum(variance(c, b) for c, b in zip(cands, combo)))
    return best


def next_step(c: Candidate, bits: int) -> tuple[Fraction, float]:
    """(efficiency, variance reduction) of c's next lower-hull step from `bits`.

    Computed independently of the module: the next hull vertex is the choice
    with more bytes that removes the most variance per extra byte.
    """
    b0, v0 = c.bytes_at_bits[bits], variance(c, bits)
    best = (Fraction(0), 0.0)
    for b in choices(c):
        db, dv = c.bytes_at_bits[b] - b0, Fraction(v0) - Fraction(variance(c, b))
        if db > 0 and dv > 0:
            best = max(best, (dv / db, float(dv)))
    return best


def check_bound(cands: list[Candidate], a: Allocation, opt: float) -> None:
    """OPT <= greedy < OPT + r, r removed by the most efficient untaken upgrade."""
    tol = 1e-12 * max(1.0, opt)
    assert a.objective >= opt - tol
    nexts = [next_step(c, a.bits[c.id]) for c in cands]
    e_max = max(e for e, _ in nexts)
    r = max(dv for e, dv in nexts if e == e_max) if e_max > 0 else 0.0
    assert a.objective - opt <= r + tol, (a, opt, r)


def test_budget_met_on_random_instances():
    rng = random.Random(0)
    for _ in range(300):
        cands = random_candidates(rng, rng.randint(1, 40))
        budget = random_budget(rng, cands)
        a = allocate(cands, budget)
        assert a.feasible
        assert a.total_bytes <= budget
        assert a.total_bytes == sum(c.bytes_at_bits[a.bits[c.id]] for c in cands)
        assert a.objective == math.fsum(variance(c, a.bits[c.id]) for c in cands)
        assert set(a.bits) == {c.id for c in cands}


def test_monotone_in_budget():
    rng = random.Random(0)
    for _ in range(4):
        cands = random_candidates(rng, 30)
        top = int(full_bytes(cands) * 1.05)
        budgets = sorted({rng.randint(0, top) for _ in range(500)} | {0, top})
        prev = None
        for budget in budgets:
            a = allocate(cands, budget)
            if a.feasible:
                assert a.total_bytes <= budget
            if prev is not None:
                assert a.objective <= prev.objective, (budget, prev.budget)
                assert a.feasible or not prev.feasible
            prev = a
        assert prev.objective == 0.0  # top >= full bytes: every variance is 0


def test_greedy_vs_brute_force_optimum():
    rng = random.Random(0)
    exact = 0
    trials = 200
    for _ in range(trials):
        cands = random_candidates(rng, rng.randint(1, 6))
        budget = random_budget(rng, cands)
        a = allocate(cands, budget)
        opt = brute_force(cands, budget)
        check_bound(cands, a, opt)
        exact += a.objective <= opt + 1e-12 * max(1.0, opt)
    # Observed: 198/200 exact with seed 0 (194-198 over seeds 0-4). Stopping at
    # the first upgrade that does not fit, without the fill step, scored only
    # 103-127/200 on the same seeds, so 90% has slack yet still bites.
    assert exact >= 0.90 * trials, exact


def test_arbitrary_tables_sweep_every_budget():
    """Unrealistic byte tables: ties, dominated widths, non-convex curves."""
    rng = random.Random(0)
    for _ in range(60):
        cands = [
            Candidate(f"r{i}", {b: rng.randint(1, 40) for b in (*BITS, 32)},
                      0.0 if rng.random() < 0.1 else rng.uniform(0, 100))
            for i in range(rng.randint(1, 4))
        ]
        prev = math.inf
        for budget in range(sum(max(c.bytes_at_bits.values()) for c in cands) + 1):
            a = allocate(cands, budget)
            assert a.total_bytes == sum(c.bytes_at_bits[a.bits[c.id]] for c in cands)
            assert a.total_bytes <= budget or not a.feasible
            assert a.objective <= prev
            prev = a.objective
            if a.feasible and budget % 3 == 0:
                check_bound(cands, a, brute_force(cands, budget))


def test_heavier_candidate_gets_more_bits():
    light, heavy = make("light", 1024, 1.0), make("heavy", 1024, 100.0)
    budget = light.bytes_at_bits[1] + heavy.bytes_at_bits[4]
    for order in ([light, heavy], [heavy, light]):
        a = allocate(order, budget)
        assert a.bits == {"light": 1, "heavy": 4}
        assert a.objective == pytest.approx(1.0 + 100.0 / 15**2)
        assert a.objective == brute_force([light, heavy], budget)


def test_non_convex_width_is_skipped_by_the_hull():
    # 2 bits lies above the chord from 1 to 4 bits: the hull jumps 1 -> 4.
    c = Candidate("nc", {1: 100, 2: 190, 4: 200, 32: 1000}, 1000.0)
    a = allocate([c], 200)
    assert (a.bits, a.total_bytes) == ({"nc": 4}, 200)
    assert a.objective == brute_force([c], 200) == 1000.0 / 225
    # One byte less: the 1 -> 4 upgrade no longer fits and 2 bits is off the
    # hull, so greedy keeps 1 bit while OPT takes 2: the documented loss.
    b = allocate([c], 199)
    assert b.bits == {"nc": 1} and brute_force([c], 199) == 1000.0 / 9
    check_bound([c], b, 1000.0 / 9)


def test_zero_weight_never_upgraded():
    cands = [make("free", 4096, 0.0), make("used", 4096)]
    a = allocate(cands, 10 * full_bytes(cands))
    assert a.bits == {"free": 1, "used": 32}
    assert a.objective == 0.0


def test_infeasible_returns_tightest_plan():
    cands = [make("a", 1000), make("b", 1), make("c", 300, full_bits=16)]
    tight = [min(c.bytes_at_bits, key=lambda b: (c.bytes_at_bits[b], b)) for c in cands]
    need = sum(c.bytes_at_bits[b] for c, b in zip(cands, tight))
    a = allocate(cands, need - 1)
    assert isinstance(a, Allocation)
    assert not a.feasible
    assert a.bits == {"a": 1, "b": 32, "c": 1}  # one fp32 element: 4 bytes < 1 bit + metadata
    assert list(a.bits.values()) == tight
    assert a.total_bytes == need > a.budget
    assert allocate(cands, need).feasible


def test_full_budget_keeps_everything_full():
    rng = random.Random(0)
    cands = [make(f"f{i}", int(2 ** rng.uniform(0, 20)), full_bits=rng.choice((16, 32))) for i in range(20)]
    a = allocate(cands, full_bytes(cands))
    assert a.bits == {c.id: c.full_bits for c in cands}
    assert a.objective == 0.0 and a.total_bytes == full_bytes(cands)
    b = allocate(cands, full_bytes(cands), allow_full=False)
    assert all(bits in BITS for bits in b.bits.values()) and b.objective > 0


def test_allowed_bits_restricts_choices():
    cands = [make(f"x{i}", 2048) for i in range(4)]
    a = allocate(cands, full_bytes(cands), allowed_bits=(2, 4), allow_full=False)
    assert set(a.bits.values()) == {4}


def test_average_bits_budget():
    cands = [make(f"u{i}", 4096) for i in range(8)]
    budget = budget_for_average_bits(cands, 2)
    assert budget == sum(c.bytes_at_bits[2] for c in cands)
    a = allocate(cands, budget)
    assert a.bits == {c.id: 2 for c in cands}
    c = cands[0]
    assert budget_for_average_bits([c], 3) == (c.bytes_at_bits[2] + c.bytes_at_bits[4]) // 2
    assert budget_for_average_bits([c], 1.5) == (c.bytes_at_bits[1] + c.bytes_at_bits[2]) // 2
    assert budget_for_average_bits([c], 32) == full_bytes([c]) == 4 * 4096
    # a candidate held to >= 8 bits (a nonlinear backward consumer) counts at 8 under a 2-bit budget, so the
    # others keep their 2 bits
    held = Candidate("held", {b: n for b, n in c.bytes_at_bits.items() if b >= 8}, 1.0)
    budget = budget_for_average_bits([held, *cands[1:]], 2)
    assert budget == held.bytes_at_bits[8] + sum(x.bytes_at_bits[2] for x in cands[1:])
    assert allocate([held, *cands[1:]], budget).bits == {"held": 8, **{x.id: 2 for x in cands[1:]}}
    with pytest.raises(ValueError, match=r"'u0'.*bits=0\.5"):
        budget_for_average_bits([c], 0.5)


def test_deterministic_under_input_order():
    rng = random.Random(0)
    cands = random_candidates(rng, 50)
    budget = random_budget(rng, cands)
    first = allocate(cands, budget)
    for _ in range(5):
        rng.shuffle(cands)
        assert allocate(cands, budget) == first


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: make("neg", 64, -1.0), r"'neg'.*weight=-1\.0"),
        (lambda: make("nan", 64, math.nan), r"'nan'.*weight=nan"),
        (lambda: Candidate("flt", {1: 8.5, 32: 256}, 1.0), r"'flt'.*bytes_at_bits\[1\]=8\.5"),
        (lambda: Candidate("key", {3: 8, 32: 256}, 1.0), r"'key'.*bytes_at_bits key 3"),
        (lambda: allocate([make("b", 64)], -5), r"budget_bytes=-5"),
        (lambda: allocate([make("b", 64)], math.nan), r"budget_bytes=nan"),
        (lambda: allocate([make("d", 64), make("d", 32)], 10**6), r"'d'.*twice"),
        (lambda: allocate([make("e", 64)], 10**6, allowed_bits=(), allow_full=False),
         r"'e'.*empty choice set"),
        (lambda: allocate([Candidate("f", {32: 4}, 1.0)], 10**6, allow_full=False),
         r"'f'.*empty choice set.*allow_full=False"),
        (lambda: allocate([make("g", 64)], 10**6, allowed_bits=(3,)), r"allowed_bits.*\[3\]"),
    ],
)
def test_validation_errors_name_the_culprit(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()
