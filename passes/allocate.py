"""Choose a bit-width for every saved tensor under a byte budget.

Problem. Each saved tensor is a `Candidate`. Storing it at width b costs
``bytes_at_bits[b]`` bytes (group metadata included) and adds
``variance(c, b) = weight / (2**b - 1)**2`` to the gradient-variance proxy;
keeping it uncompressed (``full_bits``) adds 0. `allocate` picks one width per
candidate so that the bytes fit the budget and the summed variance is small.
This is a multiple-choice knapsack (NP-hard in general), so we run the
greedy that solves its linear relaxation, round down, and fill leftover bytes.

Algorithm.
1. Every candidate starts at its cheapest choice (fewest bytes; ties: less
   variance, then fewer bits). If that plan already exceeds the budget it is
   returned with ``feasible=False``.
2. From that start, each candidate's choices are cut to the lower convex hull
   of (bytes, variance): dominated points (more bytes, not less variance) go,
   then points above a hull chord. Walking the hull gives upgrades whose
   efficiency (variance removed per extra byte, always > 0) never increases.
   A zero-weight candidate has variance 0 at every width, so no upgrades, so
   it stays at its cheapest choice whatever the budget.
3. All upgrades are sorted once by (-efficiency, id, hull step). Ids are
   unique, so this is a total order, and equal efficiencies inside one
   candidate fall back to the step index, so each candidate's upgrades stay in
   hull order. Efficiencies are exact `Fraction`s of the float variances, so
   neither the hull nor the sort is affected by rounding.
4. Walk that order once. An upgrade that fits the remaining budget is taken.
   One that does not fit is skipped, and so are its candidate's later
   upgrades (they start from the width it would have reached); smaller
   upgrades of other candidates may still use the leftover bytes ("fill").

Monotone in the budget. Run the walk at budgets W < W'. The order does not
depend on the budget, so both runs make the same decisions until the first
upgrade X that one takes and the other skips. The state before X is the same
(bytes u), so X fits W' and not W: W - u < d_X (its extra bytes). After that
point the W run only takes upgrades later in the order, of efficiency <= e_X,
within W - u bytes, so it removes at most e_X * (W - u) < e_X * d_X = r_X, the
variance X removes, while the W' run removes at least r_X. Hence the
objective at W' is <= that at W, and total_bytes <= budget always holds.
(total_bytes itself need not grow with the budget.) An infeasible budget
returns the starting plan, which every feasible budget improves on. The
reported objective is `math.fsum` of the chosen variances, a correctly rounded
and hence order-preserving image of the exact sum. The proof uses exact
efficiencies, which is why they are `Fraction`s.

Bound. Let LP be the optimum of the linear relaxation (each candidate a convex
mix of its choices, mixed bytes <= budget). It is the greedy on hull steps in
the same order, except that the first step u that does not fit (extra bytes d,
variance reduction r, efficiency e = r/d) is taken in part, by the fraction
f = (budget - T)/d < 1, T the bytes taken before u, and nothing after it. Any
integral plan is feasible for the relaxation, so with OPT the best integral
plan and R >= 0 the variance the fill removes:

    OPT <= greedy = LP + f * r - R <= OPT + e * (budget - T) < OPT + r.

u is the untaken upgrade of greatest efficiency and it is the next hull step
of its own candidate, so r <= the largest variance reduction of any
candidate's next hull step from its chosen width. If every upgrade is taken,
every candidate is at its least variance and greedy == OPT.

Cost. At most five choices per candidate, so O(n) hull work, one O(n log n)
sort and one O(n) scan. No torch, no fx: only the standard library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

COMPRESSED_BITS = (1, 2, 4, 8)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Candidate:
    """One saved tensor: bytes at each width (metadata included) and a weight."""

    id: str
    bytes_at_bits: Mapping[int, int]
    weight: float
    full_bits: int = 32

    def __post_init__(self) -> None:
        where = f"candidate {self.id!r}"
        if not isinstance(self.id, str):
            raise ValueError(f"candidate id={self.id!r}: expected a str")
        if not _is_int(self.full_bits) or self.full_bits <= max(COMPRESSED_BITS):
            raise ValueError(f"{where}: full_bits={self.full_bits!r}; expected an int > 8 (16 or 32)")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
            raise ValueError(f"{where}: weight={w!r}; expected a finite number >= 0")
        valid = (*COMPRESSED_BITS, self.full_bits)
        for bits, nbytes in self.bytes_at_bits.items():
            if not _is_int(bits) or bits not in valid:
                raise ValueError(f"{where}: bytes_at_bits key {bits!r}; valid keys are {valid}")
            if not _is_int(nbytes) or nbytes < 0:
                raise ValueError(f"{where}: bytes_at_bits[{bits}]={nbytes!r}; expected an int >= 0")
        object.__setattr__(self, "bytes_at_bits", MappingProxyType(dict(self.bytes_at_bits)))


def variance(c: Candidate, bits: int) -> float:
    """weight / (2**bits - 1)**2 for compressed widths; 0.0 for bits == c.full_bits."""
    if bits == c.full_bits:
        return 0.0
    if bits not in COMPRESSED_BITS:
        raise ValueError(f"candidate {c.id!r}: bits={bits!r}; valid are {COMPRESSED_BITS} or {c.full_bits}")
    return c.weight / (2**bits - 1) ** 2


@dataclass(frozen=True)
class Allocation:
    """The chosen width per candidate id (full_bits means uncompressed)."""

    bits: dict[str, int]
    total_bytes: int
    objective: float
    budget: int
    feasible: bool


# An upgrade: (-efficiency, id, hull step, bits after it, extra bytes).
_Step = tuple[Fraction, str, int, int, int]


def _choices(c: Candidate, allowed: frozenset[int], allow_full: bool) -> list[int]:
    bits = [b for b in c.bytes_at_bits if b in allowed]
    if allow_full and c.full_bits in c.bytes_at_bits:
        bits.append(c.full_bits)
    if not bits:
        raise ValueError(
            f"candidate {c.id!r}: empty choice set: bytes_at_bits keys {sorted(c.bytes_at_bits)}, "
            f"allowed_bits {sorted(allowed)}, allow_full={allow_full} (full_bits={c.full_bits})"
        )
    return bits


def _hull(c: Candidate, choices: list[int]) -> tuple[int, list[_Step]]:
    """The cheapest choice of `c` and the upgrades along its lower convex hull."""
    pts = sorted((c.bytes_at_bits[b], Fraction(variance(c, b)), b) for b in choices)

    def gain(p: tuple[int, Fraction, int], q: tuple[int, Fraction, int]) -> Fraction:
        return (p[1] - q[1]) / (q[0] - p[0])

    hull = [pts[0]]
    for p in pts[1:]:
        if p[1] >= hull[-1][1]:  # more (or equal) bytes, not less variance
            continue
        while len(hull) >= 2 and gain(hull[-2], hull[-1]) < gain(hull[-1], p):
            hull.pop()  # hull[-1] lies above the chord hull[-2] -> p
        hull.append(p)
    steps = [
        (-gain(a, b), c.id, i, b[2], b[0] - a[0]) for i, (a, b) in enumerate(zip(hull, hull[1:]))
    ]
    return pts[0][2], steps


def allocate(
    candidates: Sequence[Candidate],
    budget_bytes: int,
    *,
    allowed_bits: Iterable[int] = COMPRESSED_BITS,
    allow_full: bool = True,
) -> Allocation:
    """Pick a width per candidate so bytes <= budget_bytes; see the module docstring."""
    b = budget_bytes
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not b >= 0:
        raise ValueError(f"budget_bytes={b!r}; expected a number >= 0 (not NaN)")
    allowed = frozenset(allowed_bits)
    bad = [x for x in allowed if not _is_int(x) or x not in COMPRESSED_BITS]
    if bad:
        raise ValueError(f"allowed_bits contains {bad!r}; valid widths are {COMPRESSED_BITS}")

    bits: dict[str, int] = {}
    steps: list[_Step] = []
    for c in candidates:
        if c.id in bits:
            raise ValueError(f"candidate id {c.id!r} appears twice; ids must be unique")
        bits[c.id], own = _hull(c, _choices(c, allowed, allow_full))
        steps.extend(own)
    total = sum(c.bytes_at_bits[bits[c.id]] for c in candidates)
    feasible = total <= b
    if feasible:
        stuck: set[str] = set()  # candidates with a skipped upgrade
        for _, cid, _, to_bits, extra in sorted(steps):
            if cid in stuck:
                continue
            if total + extra > b:
                stuck.add(cid)
                continue
            total += extra
            bits[cid] = to_bits
    objective = math.fsum(variance(c, bits[c.id]) for c in candidates)
    return Allocation(bits, total, objective, budget_bytes, feasible)


def full_bytes(candidates: Iterable[Candidate]) -> int:
    """Bytes needed to keep every candidate uncompressed."""
    total = 0
    for c in candidates:
        if c.full_bits not in c.bytes_at_bits:
            raise ValueError(
                f"candidate {c.id!r}: bytes_at_bits has no full_bits key {c.full_bits}; "
                f"keys are {sorted(c.bytes_at_bits)}"
            )
        total += c.bytes_at_bits[c.full_bits]
    return total


def budget_for_average_bits(candidates: Iterable[Candidate], bits: float) -> int:
    """Bytes for storing every candidate at `bits` (rounded down).

    Between two available widths (the full width counts as one) the bytes are
    interpolated linearly in bits: 3 is the midpoint of the 2- and 4-bit bytes.
    A candidate whose narrowest width is above `bits` (one that must keep a
    fine step) counts at that narrowest width, so it does not squeeze the others.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise ValueError(f"bits={bits!r}; expected a finite number")
    target = Fraction(bits)
    total = Fraction(0)
    for c in candidates:
        table = sorted(c.bytes_at_bits.items())
        if target in c.bytes_at_bits:
            total += c.bytes_at_bits[target]
            continue
        if table and min(COMPRESSED_BITS) <= target < table[0][0]:
            total += table[0][1]
            continue
        for (lo, lo_bytes), (hi, hi_bytes) in zip(table, table[1:]):
            if lo < target < hi:
                total += lo_bytes + (hi_bytes - lo_bytes) * (target - lo) / (hi - lo)
                break
        else:
            raise ValueError(
                f"candidate {c.id!r}: bits={bits!r} is outside its widths {[k for k, _ in table]}"
            )
    return math.floor(total)
