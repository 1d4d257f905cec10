"""Training memory and speed: eager, inductor, inductor's recompute budget, PyTorch's fp8 pass and actc,
side by side on the same model, seed and batch.

Models. CPU: a ResNet-like CNN (actc.models.ConvNet: conv/BN/ReLU, residual, max-pool) on 3x32x32 images, and
random-init transformers GPT-2 and BERT (masked LM) at small sizes, fp32. GPU: the NOTES §7 settings: ResNet-50
fp32 batch 128 (torchvision, when installed), BERT-large fp32 batch 32 seq 128, GPT-2 small under bf16 autocast
batch 16 seq 1024. The loss is computed inside the compiled module, so what it saves is counted too.

Columns.
  saved MiB   bytes the forward keeps for the backward, seen by saved_tensors_hooks (actc.measure.saved_bytes):
              unique storages, parameters, buffers and inputs left out. Under autocast the bf16 weight copies
              a mode saves are counted (they are not parameters' storages).
  x less      inductor's saved MiB over this mode's.
  act / peak  GPU only: memory allocated after the forward minus before it; the step's peak minus before it.
  step ms     median step (forward, backward, SGD step) over the timed steps after the warm-up; on CPU only
              the ratio to inductor means anything.
  compile s   what the warm-up steps took beyond the median step: the first step's compile of forward and
              backward, plus the recompile after actc's first re-plan when its allocation is adaptive (the
              warm-up then runs past that re-plan: warmup_steps + 2 steps, so the timed steps see the final plan).
  steps, loss how many steps the mode trained (warm-up included) and its last loss, on the same batch: adaptive
              modes warm up longer, so their loss is not comparable with the others' (a sanity check only).
  re-plans    adaptive modes: re-plans made, and the recompile seconds they caused (solve ms in the CSV).
  max batch   GPU only, with --fit-cap-gib: the largest batch whose step fits that cap
              (torch.cuda.set_per_process_memory_fraction), by doubling then bisection, one subprocess a probe.
Inductor's caches are disabled (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1) unless the variable is already set: every
mode compiles cold, so compile times compare like with like, and no cache hit can hand one mode another's graph.

    python bench/bench_train.py [--quick] [--models cnn,gpt2,bert] [--modes "inductor,actc 2bit"]
                                [--steps 20] [--warmup 3] [--threads 1] [--out results] [--fit-cap-gib 16]

Prints a table and writes <out>/<device-tag>/train.csv and train.png (CPU and each GPU kind apart). A run
replaces the rows of the (model, mode) pairs it measured and keeps the others, so a long set can be measured a
model or a few modes at a time. --quick: the CNN alone, small, with eager, inductor, inductor recompute 0.3 and
actc 2bit, 5 timed steps, written to train_quick.csv and train_quick.png.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import loaders
from actc.measure import saved_bytes
from actc.models import ConvNet

MIB = 2**20
DEFAULT_MODES = ["eager", "inductor", "inductor recompute 0.3", "inductor fp8", "actc 8bit", "actc 4bit",
                 "actc 2bit", "actc 0.1", "actc 2bit + recompute 0.3"]
QUICK_MODES = ["eager", "inductor", "inductor recompute 0.3", "actc 2bit"]
FIELDS = ("device", "model", "batch", "mode", "saved_mib", "x_less", "act_mib", "peak_mib", "step_ms",
          "step_ratio", "compile_s", "steps", "loss", "max_batch", "replans", "replans_taken", "replan_solve_ms",
          "replan_recompile_s", "note")


def cnn(channels: int):
    return lambda: ConvNet(channels=channels, classes=10, in_channels=3, dropout=0.1)


def images(size: int):
    return lambda b: (torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1)),
                      torch.randint(0, 10, (b,), generator=torch.Generator().manual_seed(2)))


def tokens(context: int, vocab: int, masked: bool):
    return lambda b: loaders.token_batch(b, context, vocab, masked)


def resnet50():
    import torchvision
    return torchvision.models.resnet50(weights=None)


# name -> build (seeded by the caller), batch size, inputs(batch) -> (x, y), how the loss is taken, autocast
WORKLOADS = {
    "cpu": {
        "cnn": dict(build=cnn(32), batch=32, inputs=images(32), kind="logits"),
        "gpt2": dict(build=lambda: loaders.gpt2(2, 128, 4, 128, 1024), batch=8, inputs=tokens(128, 1024, False),
                     kind="hf"),
        "bert": dict(build=lambda: loaders.bert(2, 128, 4, 128, 1024), batch=8, inputs=tokens(128, 1024, True),
                     kind="hf"),
    },
    "quick": {"cnn": dict(build=cnn(16), batch=16, inputs=images(32), kind="logits")},
    "cuda": {
        "resnet50": dict(build=resnet50, batch=128, inputs=images(224), kind="logits", needs="torchvision"),
        "bert-large": dict(build=lambda: loaders.bert(24, 1024, 16, 512, 30522), batch=32,
                           inputs=tokens(128, 30522, True), kind="hf"),
        "gpt2-small": dict(build=lambda: loaders.gpt2(12, 768, 12, 1024, 50257), batch=16,
                           inputs=tokens(1024, 50257, False), kind="hf", autocast=torch.bfloat16),
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None, help="comma-separated (default: all of the device's models)")
    p.add_argument("--modes", default=None, help=f"comma-separated names from common.MODES (default: {DEFAULT_MODES})")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 20; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing, the compiling first step included")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: on a shared machine two OpenMP "
                   "threads stall at barriers whenever another process takes a core)")
    p.add_argument("--out", default=str(common.REPO / "results"), help="files go to OUT/<device-tag>/")
    p.add_argument("--quick", action="store_true", help="the small CNN, four modes, five timed steps")
    p.add_argument("--fit-cap-gib", type=float, default=0.0, help="GPU: find the largest batch under this cap")
    p.add_argument("--probe-batch", type=int, default=None, help=argparse.SUPPRESS)  # one fit probe (subprocess)
    args = p.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_for(mode: dict, warmup: int) -> int:
    """Warm-up steps: ``warmup``, or past actc's first re-plan when its allocation is adaptive (the re-plan
    recompiles the graphs it changes; the next one comes ``replan_every`` steps later, after the timed steps)."""
    after = common.replan_after(mode)
    return max(warmup, after + 2) if after else warmup


def run_mode(work: dict, batch: int, mode: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """Train ``warmup + steps`` steps of SGD under ``mode``; then measure one step's saved bytes (and memory)."""
    warmup = warmup_for(mode, warmup)
    torch.manual_seed(0)
    model = work["build"]().to(device)
    model.train()
    wrapped = common.LossOf(model, work["kind"], work.get("autocast"))
    x, y = (t.to(device) for t in work["inputs"](batch))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with common.mode_config(mode), common.actc_warnings() as warned, common.actc_replans() as replans_so_far:
        fn = common.compile_for(wrapped, mode)
        torch.manual_seed(1)

        def step() -> torch.Tensor:
            loss = fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            loss = step()
            sync(device)
            times.append(time.perf_counter() - t0)
        exclude = (*model.parameters(), *model.buffers(), x, y)
        nbytes, out = saved_bytes(lambda: fn(x, y), exclude)
        out.backward()
        opt.zero_grad(set_to_none=True)
        median = statistics.median(times[warmup:])
        row = dict(saved_mib=nbytes / MIB, step_ms=1e3 * median, compile_s=sum(t - median for t in times[:warmup]),
                   loss=loss.item(), steps=warmup + steps, note="; ".join(warned)[:300])
        replans = replans_so_far()
        if replans:  # adaptive allocation: what its re-plans cost (solve, and the recompiles they caused)
            row.update(replans=len(replans), replans_taken=sum(r["accepted"] for r in replans),
                       replan_solve_ms=sum(r["solve_ms"] for r in replans),
                       replan_recompile_s=sum(r["recompile_s"] for r in replans))
        if device.type == "cuda":
            del out
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn(x, y)
            sync(device)
            row["act_mib"] = (torch.cuda.memory_allocated(device) - before) / MIB
            out.backward()
            opt.step()
            sync(device)
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / MIB
            opt.zero_grad(set_to_none=True)
    return row


def probe(args: argparse.Namespace, workloads: dict, modes: dict) -> int:
    """Subprocess body of the batch search: 0 when two steps fit the cap, 3 on out-of-memory."""
    device = torch.device(args.device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.fit_cap_gib * 2**30 / total), device)
    (work,), (mode,) = workloads.values(), modes.values()
    try:
        run_mode(work, args.probe_batch, mode, device, steps=1, warmup=1)
    except torch.OutOfMemoryError:
        return 3
    return 0


def max_batch(args: argparse.Namespace, model: str, mode: str, start: int) -> int | None:
    """Largest batch that fits --fit-cap-gib: double from ``start`` (up to 64x) until a probe fails, or bisect
    below it, to within an eighth; None when not even batch 1 fits."""
    def fits(b: int) -> bool:
        cmd = [sys.executable, __file__, "--device", args.device, "--models", model, "--modes", mode,
               "--fit-cap-gib", str(args.fit_cap_gib), "--probe-batch", str(b)]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    if fits(start):
        lo, hi = start, 2 * start
        while fits(hi):
            lo, hi = hi, 2 * hi
            if hi > 64 * start:
                return lo  # never ran out: a lower bound
    else:
        lo, hi = 0, start
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo or None


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """One row of panels per model: saved MiB per mode, step time over inductor's."""
    plt = common.pyplot()
    if plt is None:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 3.6 * len(models)), squeeze=False)
    for (ax_mem, ax_time), model in zip(axes, models):
        rs = [r for r in rows if r["model"] == model]
        names = [r["mode"] for r in rs]
        saved = [r.get("saved_mib") or 0.0 for r in rs]
        bars = ax_mem.barh(names, saved, color="tab:blue")
        for bar, r in zip(bars, rs):
            if r.get("saved_mib") is None:
                label = " " + str(r.get("note", "")).split(":")[0]  # skipped / failed
            else:
                label = f" {r['saved_mib']:.2f} MiB" + (f" ({r['x_less']:.1f}x less)" if r.get("x_less") else "")
            ax_mem.annotate(label, (bar.get_width(), bar.get_y() + 0.4), va="center", fontsize=7)
        ax_mem.set_xlim(0, 1.45 * max(saved + [1e-9]))
        ax_mem.set_title(f"{model} (batch {rs[0]['batch']}): saved for backward, MiB", fontsize=9)
        ratios = [r.get("step_ratio") or 0.0 for r in rs]
        bars = ax_time.barh(names, ratios, color="tab:orange")
        for bar, ratio in zip(bars, ratios):
            if ratio:
                ax_time.annotate(f" {ratio:.2f}", (bar.get_width(), bar.get_y() + 0.4), va="center", fontsize=7)
        ax_time.axvline(1.0, color="k", lw=0.8)
        ax_time.set_xlim(0, 1.15 * max(ratios + [1.0]))
        ax_time.set_title(f"{model}: step time / inductor's (median)", fontsize=9)
        for ax in (ax_mem, ax_time):
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
            ax.grid(True, axis="x", alpha=0.3)
        ax_time.set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    common.disable_inductor_caches()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    table = "quick" if args.quick and device.type == "cpu" else device.type
    workloads = common.select_names(WORKLOADS[table], args.models) if args.models else WORKLOADS[table]
    modes = common.select_modes(args.modes or (QUICK_MODES if args.quick else DEFAULT_MODES))
    if args.probe_batch is not None:
        return probe(args, workloads, modes)
    tag = common.device_tag(device)
    print(f"bench_train on {common.machine()}; {args.warmup} warm-up + {args.steps} timed steps; caches "
          f"{'disabled' if os.environ.get('TORCHINDUCTOR_FORCE_DISABLE_CACHES') == '1' else 'ENABLED'}")
    rows = []
    for model_name, work in workloads.items():
        if work.get("needs"):
            try:
                __import__(work["needs"])
            except ImportError:
                print(f"{model_name}: skipped, {work['needs']} is not installed")
                continue
        for mode_name, mode in modes.items():
            row = dict(device=tag, model=model_name, batch=work["batch"], mode=mode_name)
            reason = common.fp8_skip_reason(device, work.get("autocast")) if mode.get("fp8") else None
            if reason:
                print(f"{model_name} / {mode_name}: skipped, {reason}")
                row["note"] = "skipped: " + reason
            else:
                print(f"{model_name} / {mode_name} ...", flush=True)
                try:
                    row.update(run_mode(work, work["batch"], mode, device, args.steps, args.warmup))
                except Exception as e:  # one broken mode must not lose the others' figures
                    row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"  {row['note']}")
                if args.fit_cap_gib and device.type == "cuda" and mode["backend"] is not None:
                    row["max_batch"] = max_batch(args, model_name, mode_name, work["batch"])
            rows.append(row)
            torch._dynamo.reset()
    out = Path(args.out) / tag
    stem = "train_quick" if args.quick else "train"
    rows = common.merge_csv(out / f"{stem}.csv", rows, ("model", "mode"))
    common.sort_rows(rows, WORKLOADS[table], common.MODES)
    for r in rows:
        base = common.baseline(rows, r, needs="saved_mib")
        if base and r.get("saved_mib") is not None:
            r["x_less"] = base["saved_mib"] / max(r["saved_mib"], 1e-9)
            r["step_ratio"] = r["step_ms"] / base["step_ms"]
    columns = [("model", "model", ""), ("mode", "mode", ""), ("saved MiB", "saved_mib", ".2f"),
               ("x less", "x_less", ".1f"), ("step ms", "step_ms", ".1f"), ("x inductor", "step_ratio", ".2f"),
               ("compile s", "compile_s", ".1f"), ("steps", "steps", "d"), ("loss", "loss", ".4f"), ("re-plans", "replans", "d"),
               ("re-plan recompile s", "replan_recompile_s", ".1f")]
    if device.type == "cuda":
        columns[4:4] = [("act MiB", "act_mib", ".0f"), ("peak MiB", "peak_mib", ".0f")]
        columns.append(("max batch", "max_batch", "d"))
    print()
    common.print_table(rows, columns)
    for r in rows:
        if r.get("note"):
            print(f"  {r['model']} / {r['mode']}: {r['note']}")
    common.write_csv(rows, out / f"{stem}.csv", FIELDS)
    plotted = plot(rows, out / f"{stem}.png", f"training step, {tag}: {common.machine()}")
    print(f"wrote {out / f'{stem}.csv'}" + (f" and {out / f'{stem}.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
