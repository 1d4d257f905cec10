"""Training quality under activation compression: fp32 (inductor) against actc at 8, 4 and 2 bits and at 2 bits
with Inductor's recompute budget, every mode with the same seed, data order and number of steps.

  fmnist  a small CNN (common.SmallCNN: conv/BN/ReLU/max-pool twice, dropout, linear) on Fashion-MNIST,
          the full 60k train set (500 batches of 120 an epoch, reshuffled each epoch), 2 epochs of SGD with
          momentum and a cosine schedule; reported: accuracy on the 10k test set, in %.
  enwiki  a byte-level transformer LM (actc.models.TinyGPT) on the English-Wikipedia slice (first 90% train,
          last 10% validation): a fixed number of AdamW steps on random windows; reported: loss on the whole
          validation slice (non-overlapping windows), in bits per byte.
  enwiki-large  the same task with a width-256, 4-layer LM on windows of 256 bytes, batch 4.
Sizes (a 16/32-channel CNN; a width-128, 2-layer LM trained 1000 steps on 16 windows of 128 bytes) keep one
mode between 1.5 and 20 minutes on one thread of a shared 2-core CPU, compiles included. Evaluation runs the
same parameters in eager mode (model.eval(), no grad), so it measures what training did and not a compiled
inference graph. The "saved MiB" column is actc.measure.saved_bytes of one training
forward (parameters and inputs left out). Targets at 2 bits: accuracy within 0.3 points of fp32, validation
loss within 1%. Inductor's caches are disabled (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, unless already set), so
each mode's graphs really go through its partitioner.

    python bench/convergence.py [--task fmnist|enwiki|enwiki-large|all] [--modes "inductor,actc 2bit"] [--data DIR]
                                [--epochs 2] [--steps 1000] [--seed 0] [--limit N] [--threads 1] [--out results]

--data defaults to ../shared/data beside the repo (see its README for the files and where they come from).
Writes <out>/<device-tag>/convergence_<task>.csv (one row per mode), convergence_<task>_curve.csv (loss per
step, evaluations) and convergence_<task>.png. A run with --modes replaces those modes' rows and keeps the
others, so modes can be run one process at a time. --limit N stops every mode after N steps (smoke runs).
--seed S (default 0) changes the initial weights, the data order and the rounding draws; its rows are named
"<mode> seedS" and compared with "inductor seedS", so a second seed shows how much of a gap is noise.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import loaders
from actc.measure import saved_bytes
from actc.models import TinyGPT

DEFAULT_MODES = ["inductor", "actc 8bit", "actc 4bit", "actc 2bit", "actc 2bit static", "actc 2bit + recompute 0.3"]
BASELINE = "inductor"
LN2 = math.log(2)
TASKS = {
    "fmnist": dict(build=lambda: common.SmallCNN(channels=16, classes=10, in_channels=1, dropout=0.1), batch=120,
                   opt=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
                   metric="test acc %", target=("points", 0.3), higher_is_better=True),
    "enwiki": dict(build=lambda: TinyGPT(vocab=256, width=128, layers=2, heads=4, context=128), batch=16,
                   context=128, opt=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01),
                   metric="val bits/byte", target=("relative", 0.01), higher_is_better=False),
    # issue 16's larger LM: 4x the width x depth and twice the context (not in --task all)
    "enwiki-large": dict(build=lambda: TinyGPT(vocab=256, width=256, layers=4, heads=8, context=256), batch=4,
                         context=256, opt=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
                         metric="val bits/byte", target=("relative", 0.01), higher_is_better=False),
}
SUMMARY = ("device", "task", "mode", "steps", "metric", "value", "delta", "final_loss", "saved_mib", "step_ms",
           "compile_s", "train_s", "eval_s", "note")
CURVE = ("task", "mode", "step", "train_loss", "eval")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="all", choices=["all", *TASKS])
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated names from common.MODES")
    p.add_argument("--data", default=None, help=f"data folder (default {loaders.DEFAULT_DATA})")
    p.add_argument("--epochs", type=int, default=2, help="fmnist epochs")
    p.add_argument("--steps", type=int, default=1000, help="enwiki steps")
    p.add_argument("--eval-every", type=int, default=250, help="enwiki: steps between validation estimates")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and rounding draws (0: the default rows)")
    p.add_argument("--limit", type=int, default=None, help="stop each mode after this many steps (smoke runs)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--out", default=str(common.REPO / "results"), help="files go to OUT/<device-tag>/")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- data order
def fmnist_batches(x: torch.Tensor, y: torch.Tensor, batch: int, epochs: int, seed: int = 0):
    """Every epoch a fresh permutation from a fixed seed: the same order for every mode."""
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + epoch + 100 * seed))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx], (i + batch) >= len(x) - batch + 1  # last batch of the epoch


def lm_batches(data: torch.Tensor, batch: int, context: int, steps: int, every: int, seed: int = 0):
    g = torch.Generator().manual_seed(1000 + seed)
    offsets = torch.arange(context + 1)
    for step in range(steps):
        seq = data[torch.randint(0, len(data) - context - 1, (batch, 1), generator=g) + offsets].long()
        yield seq[:, :-1], seq[:, 1:], (step + 1) % every == 0 or step + 1 == steps


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum().item() for i in range(0, len(x), 2000))
    model.train()
    return 100.0 * correct / len(x)


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, data: torch.Tensor, context: int, windows: int | None = None) -> float:
    """Mean next-byte cross-entropy over non-overlapping windows (all of them, or the first ``windows``), in bits."""
    model.eval()
    n = (len(data) - 1) // context if windows is None else windows
    total = 0.0
    for i in range(0, n, 64):
        starts = torch.arange(i, min(n, i + 64)) * context
        seq = data[starts[:, None] + torch.arange(context + 1)].long()
        logits = model(seq[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), seq[:, 1:].reshape(-1), reduction="sum").item()
    model.train()
    return total / (n * context) / LN2


# --------------------------------------------------------------------------------------------- training
def train(task: str, mode: dict, data: tuple, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    spec = TASKS[task]
    torch.manual_seed(args.seed)
    model = spec["build"]()
    model.train()
    opt = spec["opt"](model.parameters())
    if task == "fmnist":
        xtr, ytr, xte, yte = data
        total = args.epochs * (len(xtr) // spec["batch"])
        batches = fmnist_batches(xtr, ytr, spec["batch"], args.epochs, args.seed)
        evaluate = lambda: accuracy(model, xte, yte)  # noqa: E731
        final = evaluate
    else:
        train_bytes, val_bytes = data
        total = args.steps
        batches = lm_batches(train_bytes, spec["batch"], spec["context"], total, args.eval_every, args.seed)
        evaluate = lambda: bits_per_byte(model, val_bytes, spec["context"], windows=256)  # noqa: E731  quick
        final = lambda: bits_per_byte(model, val_bytes, spec["context"])  # noqa: E731
    steps = min(total, args.limit or total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    curve, x, times, eval_s = [], None, [], 0.0
    with common.mode_config(mode), common.actc_warnings() as warned:
        fn = common.compile_for(common.LossOf(model, "logits"), mode)
        torch.manual_seed(1 + args.seed)  # dropout masks and stochastic rounding draw from here on, the same for every mode
        for step, (x, y, eval_now) in enumerate(batches):
            if step == steps:
                break
            start = time.perf_counter()
            loss = fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            row = dict(step=step + 1, train_loss=loss.item(), eval="")
            times.append(time.perf_counter() - start)
            if eval_now or step + 1 == steps:
                start = time.perf_counter()
                row["eval"] = evaluate() if step + 1 < steps else final()
                eval_s += time.perf_counter() - start
                print(f"  step {step + 1}/{steps}: train loss {row['train_loss']:.4f}, "
                      f"{spec['metric']} {row['eval']:.4f}", flush=True)
            curve.append(row)
        nbytes, out = saved_bytes(lambda: fn(x, y), (*model.parameters(), *model.buffers(), x, y))
        out.backward()
    summary = dict(steps=steps, metric=spec["metric"], value=curve[-1]["eval"], train_s=sum(times), eval_s=eval_s,
                   compile_s=times[0], step_ms=1e3 * statistics.median(times[1:] or times),
                   saved_mib=nbytes / 2**20, final_loss=curve[-1]["train_loss"],
                   note="; ".join(warned)[:300])
    return summary, curve


def plot(task: str, curve: list[dict], path: Path, title: str) -> bool:
    """Training loss (moving average), its difference to the baseline's, and the evaluation metric, per mode."""
    plt = common.pyplot()
    if plt is None:
        return False
    fig, (ax_loss, ax_diff, ax_eval) = plt.subplots(1, 3, figsize=(16, 4.5))
    modes = list(dict.fromkeys(r["mode"] for r in curve))
    smooth: dict[str, list[float]] = {}
    k = 1
    for mode in modes:
        losses = [float(r["train_loss"]) for r in curve if r["mode"] == mode]
        k = max(1, len(losses) // 40)
        smooth[mode] = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                        for i in range(len(losses))]
    diff_tail = [0.0]
    for j, mode in enumerate(modes):
        rs = [r for r in curve if r["mode"] == mode]
        steps = [r["step"] for r in rs]
        ax_loss.plot(steps, smooth[mode], lw=1, color=f"C{j}", label=mode)
        ref = BASELINE + seed_suffix(mode)
        if ref in smooth and mode != ref:
            n = min(len(smooth[mode]), len(smooth[ref]))
            diff = [a - b for a, b in zip(smooth[mode][:n], smooth[ref][:n])]
            ax_diff.plot(steps[:n], diff, lw=1, color=f"C{j}", label=mode)
            diff_tail += [abs(d) for d in diff[n // 20:]]
        ev = [(r["step"], float(r["eval"])) for r in rs if r["eval"] not in ("", None)]
        ax_eval.plot(*zip(*ev), marker="o", lw=1, color=f"C{j}", label=mode)
    ax_diff.set_ylim(-1.2 * max(diff_tail) - 1e-9, 1.2 * max(diff_tail) + 1e-9)  # past the first steps' spike
    tail = [v for vals in smooth.values() for v in vals[len(vals) // 20:]]
    if tail:
        ax_loss.set_ylim(0.95 * min(tail), 1.05 * max(tail))  # the first steps' spike would hide the rest
    ax_loss.set_title(f"training loss (moving average of {k} steps)", fontsize=9)
    ax_diff.axhline(0, color="k", lw=0.8)
    ax_diff.set_title(f"training loss minus {BASELINE}'s (same moving average)", fontsize=9)
    whole = "test set" if task == "fmnist" else "validation slice"
    ax_eval.set_title(f"{TASKS[task]['metric']} (last point: the full {whole})", fontsize=9)
    for ax in (ax_loss, ax_diff, ax_eval):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    ax_eval.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def seed_suffix(mode: str) -> str:
    """" seedS" for the rows of a --seed run, "" for the default seed's."""
    return mode[mode.rfind(" seed"):] if " seed" in mode else ""


def report(task: str, rows: list[dict]) -> None:
    spec = TASKS[task]
    bases = {seed_suffix(r["mode"]): r for r in rows if r["mode"] == BASELINE + seed_suffix(r["mode"])}
    base = bases.get("")
    for r in rows:
        own = bases.get(seed_suffix(r["mode"]))
        if own is not None:
            r["delta"] = r["value"] - own["value"]
            if spec["target"][0] == "relative":
                r["delta"] = r["delta"] / own["value"]
    unit = "points" if spec["target"][0] == "points" else "relative"
    common.print_table(rows, [("mode", "mode", ""), ("steps", "steps", "d"), (spec["metric"], "value", ".4f"),
                              (f"delta vs {BASELINE} ({unit})", "delta", "+.4f"),
                              ("final train loss", "final_loss", ".4f"),
                              ("saved MiB", "saved_mib", ".2f"), ("step ms", "step_ms", ".0f"),
                              ("compile s", "compile_s", ".0f"), ("train s", "train_s", ".0f")])
    for r in rows:
        if r.get("note"):
            print(f"  {r['mode']}: {r['note']}")
    two = next((r for r in rows if r["mode"] == "actc 2bit"), None)
    if base is not None and two is not None:
        kind, bound = spec["target"]
        miss = -two["delta"] if spec["higher_is_better"] else two["delta"]
        verdict = "met" if miss <= bound else f"MISSED by {miss - bound:.4g}"
        print(f"target at 2bit: {spec['metric']} within {bound:g} {unit} of {BASELINE}: {verdict} "
              f"(actc 2bit minus {BASELINE}: {two['delta']:+.4g} {unit})")


def main(argv=None) -> int:
    args = parse_args(argv)
    common.disable_inductor_caches()
    torch.set_num_threads(args.threads)
    root = loaders.data_dir(args.data)
    modes = common.select_modes(args.modes)
    tag = common.device_tag(torch.device("cpu"))
    out = Path(args.out) / tag
    print(f"convergence on {common.machine()}")
    for task in (["fmnist", "enwiki"] if args.task == "all" else [args.task]):  # all: the two quick tasks
        data = loaders.fashion_mnist(root) if task == "fmnist" else loaders.enwiki(root)
        rows, curve = [], []
        for name, mode in modes.items():
            name = name if args.seed == 0 else f"{name} seed{args.seed}"
            print(f"{task} / {name}", flush=True)
            summary, c = train(task, mode, data, args)
            rows.append(dict(device=tag, task=task, mode=name, **summary))
            curve += [dict(task=task, mode=name, **r) for r in c]
            torch._dynamo.reset()
        rows = common.merge_csv(out / f"convergence_{task}.csv", rows, ("mode",))
        curve = common.merge_csv(out / f"convergence_{task}_curve.csv", curve, ("mode",))
        print()
        report(task, rows)
        common.write_csv(rows, out / f"convergence_{task}.csv", SUMMARY)
        common.write_csv(curve, out / f"convergence_{task}_curve.csv", CURVE)
        plotted = plot(task, curve, out / f"convergence_{task}.png", f"{task}: same seed, data and steps; {common.machine()}")
        print(f"wrote {out}/convergence_{task}.csv and convergence_{task}_curve.csv"
              + (f" and convergence_{task}.png" if plotted else "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
