"""The plan: one record per saved tensor, filled by the passes, printed by `actc dump`, `actc.explain`,
the `actc` logger and the dump directory alike.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class TensorPlan:
    name: str                 # forward node compressed (the alias root)
    shape: str
    dtype: str
    producer: str             # op that made it
    kind: str                 # "quant" | "mask" | "keep" (allocator kept it) | "skip" | "recompute" (passes/remat.py)
    bits: int | None          # stored bits per element (None when skipped)
    bytes_before: int
    bytes_after: int
    reason: str = ""          # why skipped/kept, or which aliases it stands for
    consumer: str = ""        # "linear" | "other" | "smooth" | "stat" | "exp": how the backward reads it (passes/candidates.py)
    weight: float = 0.0       # sensitivity weight the allocator used
    activation: bool = True   # primals and parameter-derived tensors are listed but not counted
    module: str = ""          # innermost module that made it ("blocks.0.mlp.fc1"), from nn_module_stack


@dataclass
class GraphPlan:
    graph: int                # index of the compiled graph in this session (graph breaks give several)
    budget: str
    budget_bytes: int
    feasible: bool
    tensors: list[TensorPlan] = field(default_factory=list)
    forward_code: str = ""
    backward_code: str = ""
    error: str = ""           # set when actc fell back to the uncompressed graphs
    recompute: float | None = None  # Inductor's recompute budget the graph was partitioned under

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors if t.activation)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors if t.activation)

    def totals(self) -> str:
        compressed = sum(t.kind in ("quant", "mask") for t in self.tensors)
        activations = sum(t.activation for t in self.tensors)
        return (f"actc graph {self.graph}: {compressed}/{activations} saved activations compressed, "
                f"{mib(self.bytes_before)} -> {mib(self.bytes_after)} MiB "
                f"({less(self.bytes_before, self.bytes_after)}), budget {self.budget}"
                + (f", recompute budget {self.recompute:g}" if self.recompute is not None else "")
                + ("" if self.feasible else " (infeasible: tightest plan used)")
                + (f" [fell back: {self.error}]" if self.error else ""))


def less(before: int, after: int) -> str:
    """How many times less is saved: "9.6x less", or "nothing saved" when everything is recomputed."""
    return f"{before / after:.1f}x less" if after else "nothing saved"


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


HEADER = ("module", "name", "shape", "dtype", "producer", "bits", "before", "after", "reason")


def table(plans: list[GraphPlan], primals: bool = False) -> str:
    """A fixed-width table of every saved activation in every graph (primals and parameter-derived tensors
    too with ``primals``), with per-graph and overall totals."""
    rows = [("graph",) + HEADER]
    for p in plans:
        for t in p.tensors:
            if not (t.activation or primals):
                continue
            bits = "-" if t.bits is None else str(t.bits)
            rows.append((str(p.graph), t.module or "-", t.name, t.shape, t.dtype, t.producer, bits,
                         str(t.bytes_before), str(t.bytes_after), t.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += [p.totals() for p in plans]
    before, after = sum(p.bytes_before for p in plans), sum(p.bytes_after for p in plans)
    lines.append(f"total: {mib(before)} -> {mib(after)} MiB of activations saved for backward "
                 f"({less(before, after)}; primals and parameter-derived tensors not counted)")
    return "\n".join(lines)


def shape_list(shape: str) -> list[int | str]:
    """"(8, 64, s0)" -> [8, 64, "s0"]: ints, and symbolic sizes as their names."""
    return [int(d) if d.lstrip("-").isdigit() else d for d in shape.strip("()").replace(" ", "").split(",") if d]


def to_json(plans: list[GraphPlan], include_code: bool = True) -> str:
    out = []
    for p in plans:
        d = asdict(p)
        d["bytes_before"], d["bytes_after"] = p.bytes_before, p.bytes_after
        for t in d["tensors"]:
            t["shape"] = shape_list(t["shape"])
        if not include_code:
            d.pop("forward_code"), d.pop("backward_code")
        out.append(d)
    before, after = sum(p.bytes_before for p in plans), sum(p.bytes_after for p in plans)
    return json.dumps({"graphs": out, "bytes_before": before, "bytes_after": after}, indent=2)
