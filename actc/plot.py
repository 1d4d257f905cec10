"""``actc dump --plot plan.png``: saved bytes per module before and after, and the bits chosen.

One horizontal bar pair per module, in forward order: the light bar is what Inductor saves, the dark one
what actc saves; the label at the right lists the widths (``2b``, ``4b``, ``1b`` for masks, ``full`` when
kept exact). matplotlib is an optional extra (``pip install actc[bench]``).
"""
from __future__ import annotations

from actc.plan import GraphPlan


def by_module(plans: list[GraphPlan]) -> list[tuple[str, int, int, list[str]]]:
    """(module, bytes before, bytes after, widths) in the order modules first appear."""
    rows: dict[str, list] = {}
    for p in plans:
        for t in p.tensors:
            if not t.activation:
                continue
            row = rows.setdefault(t.module or "(no module)", [0, 0, []])
            row[0] += t.bytes_before
            row[1] += t.bytes_after
            width = "recompute" if t.kind == "recompute" else f"{t.bits}b" if t.bits else "full"
            if width not in row[2]:
                row[2].append(width)
    return [(m, b, a, w) for m, (b, a, w) in rows.items()]


def plot_plan(plans: list[GraphPlan], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("actc dump --plot needs matplotlib: pip install matplotlib") from None
    rows = by_module(plans)
    if not rows:
        raise SystemExit("actc dump --plot: the plan has no saved activations to draw")
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(rows)))
    ys = range(len(rows))[::-1]
    ax.barh([y + 0.2 for y in ys], [r[1] / 2**10 for r in rows], height=0.4, color="#c6dbef", label="inductor")
    ax.barh([y - 0.2 for y in ys], [r[2] / 2**10 for r in rows], height=0.4, color="#08519c", label="actc")
    top = max(r[1] for r in rows) / 2**10
    for y, (_, before, _, widths) in zip(ys, rows):
        ax.text(before / 2**10 + top * 0.01, y, " ".join(widths), va="center", fontsize=8)
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("KiB saved for the backward")
    ax.set_xlim(0, top * 1.25)
    before, after = sum(r[1] for r in rows), sum(r[2] for r in rows)
    ax.set_title(f"{before / 2**20:.2f} -> {after / 2**20:.2f} MiB ({before / max(after, 1):.1f}x less), "
                 f"budget {plans[0].budget}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
