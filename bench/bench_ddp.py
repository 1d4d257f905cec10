"""Saved bytes under DDP's graph split against one process: does compression survive the cut?

DDPOptimizer cuts a compiled model at its gradient buckets; the activation that crosses a cut is an output
of one graph and an input of the next. The model is issue 14's: Linear(768) -> GELU twice and a head,
batch 64 per process (a ReLU variant beside it). Each weight is 2.4 MB, so with 1 MB buckets every layer
is a graph of its own. Every mode runs in two gloo processes (DDP) and in one process without DDP, on the
same half-batch; saved bytes by ``saved_tensors_hooks``, parameters and the input left out.

    python bench/bench_ddp.py [--modes "inductor,actc default,..."] [--out results]

Columns: saved KiB in one process and under DDP, "x less" than Inductor in each, and "gap", the one-process
ratio over the DDP one (issue 14's goal: at most 1.25). Prints a table and writes
<out>/<device-tag>/ddp.csv and ddp.png. Memory does not depend on machine load.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from actc.measure import saved_bytes  # noqa: E402

WIDTH, BATCH, WORLD = 768, 64, 2
MODES = {"inductor": None, "actc default": {}, "actc default + credit": {"recompute_credit": True},
         "actc 2bit recompute 1.0": {"memory_budget": "2bit", "recompute": 1.0}}
ACTS = {"gelu": F.gelu, "relu": torch.relu}


class MLP(nn.Module):
    def __init__(self, act: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.head = nn.Linear(WIDTH, 10)
        self.act = ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


def measure(act: str, options: dict | None, ddp: bool) -> int:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP(act)
    wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1) if ddp else model
    compiled = torch.compile(wrapped, backend="inductor") if options is None else \
        torch.compile(wrapped, backend="actc", options=options)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(dist.get_rank()))
    compiled(x).sum().backward()  # compile
    nbytes, out = saved_bytes(lambda: compiled(x), (*model.parameters(), x))
    out.sum().backward()
    return nbytes


def worker(rank: int, init: str, modes: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    rows = [dict(model=f"mlp-{act}", mode=mode, one=measure(act, MODES[mode], False),
                 ddp=measure(act, MODES[mode], True)) for act in ACTS for mode in modes]
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    rows = [r for r in rows if r["mode"] != "inductor"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['model']}\n{r['mode']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["one_x_less"] for r in rows], 0.4, label="one process")
    ax.bar([x + 0.2 for x in xs], [r["ddp_x_less"] for r in rows], 0.4, label="DDP, 1 MB buckets")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("saved bytes, x less than Inductor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=str(common.REPO / "results"))
    args = p.parse_args(argv)
    modes = list(common.select_names(MODES, args.modes))
    if "inductor" not in modes:
        modes.insert(0, "inductor")
    common.disable_inductor_caches()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.pt")
        mp.spawn(worker, args=(f"file://{tmp}/store", modes, result), nprocs=WORLD, join=True)
        rows = torch.load(result)
    for r in rows:
        base = common.baseline(rows, r)
        r["one_kib"], r["ddp_kib"] = r["one"] / 1024, r["ddp"] / 1024
        r["one_x_less"], r["ddp_x_less"] = base["one"] / r["one"], base["ddp"] / r["ddp"]
        r["gap"] = r["one_x_less"] / r["ddp_x_less"]
    print(common.machine())
    common.print_table(rows, [("model", "model", ""), ("mode", "mode", ""), ("one KiB", "one_kib", ".1f"),
                              ("DDP KiB", "ddp_kib", ".1f"), ("x less, one", "one_x_less", ".2f"),
                              ("x less, DDP", "ddp_x_less", ".2f"), ("gap", "gap", ".2f")])
    out = Path(args.out) / common.device_tag(torch.device("cpu"))
    common.write_csv(rows, out / "ddp.csv", ("model", "mode", "one_kib", "ddp_kib", "one_x_less", "ddp_x_less", "gap"))
    plot(rows, out / "ddp.png")
    print(f"wrote {out / 'ddp.csv'} and ddp.png")


if __name__ == "__main__":
    main()
