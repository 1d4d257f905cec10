"""Bandwidth of the quantize / dequantize kernels, against a plain device copy of the same input.

For each size (MiB of fp32 input) and bit width, times compress (quantize) and decompress (dequantize):

  inductor  torch.compile of the aten code in actc.kernels.quant, as actc's graphs run it: the noise a hash
            of the element index and a seed tensor, computed inside the kernel (actc.kernels.noise)
  philox    the same with the noise from torch.rand, which Inductor turns into its Philox RNG (compress
            only; what actc's graphs used before the hash)
  triton    the hand-written kernels of actc.kernels.triton_quantize / triton_dequantize (Philox in-kernel);
            GPU only: the interpreter (TRITON_INTERPRET=1) runs them on CPU, but its timings mean nothing
  copy      y.copy_(x) of the fp32 input into a buffer allocated once: the bandwidth a memory-bound kernel
            can hope for
  clone     x.clone(): the same copy into a fresh output, as every compiled compress and decompress call
            allocates its outputs

GB/s counts bytes read plus bytes written (compress: input + codes + meta; decompress: the reverse;
copy and clone: twice the input), and ``x copy`` / ``x clone`` are that bandwidth over the copy's / the
clone's. On the CPU a fresh output of many MiB costs its page faults: at 64 MiB, one thread, the clone
takes several times the copy's time here (the table shows both), as any op that writes a new tensor of
that size must. Like compares with like: compress, whose new outputs are
1/32 to 1/4 of its input, with the copy; decompress, which writes a new full-size tensor, with the clone.
The plot draws those two ratios against the goals (issue 15 on the CPU: compress >= 0.3, decompress >= 0.5
at 64 MiB, one thread; 0.8 on a GPU, where the caching allocator reuses memory and the two baselines
agree). On GPU the times are
triton.testing.do_bench medians; at the small sizes they include the host's launch overhead (Dynamo
guards for inductor, the Python launcher for triton), which a copy_ mostly escapes.

CPU figures are ratios only: medians of time.perf_counter runs, on one thread by default, and CPU
bandwidth depends on threads, caches (a 1 MiB copy stays in cache) and whatever else the machine runs.

    python bench/bench_kernels.py [--sizes 1,4,16] [--bits 1,2,4,8] [--group 128] [--threads 1]
                                  [--device cuda] [--out results] [--quick]

Prints the table as it measures, then writes <out>/<device-tag>/kernels.csv and kernels.png (GB/s, and the
fraction of the copy's (compress) or the clone's (decompress) bandwidth, with the goals above).
"""
from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from actc.kernels import quant

MIB = 1 << 20
FIELDS = ("device", "size_mib", "bits", "group", "op", "path", "ms", "gbps", "x_copy", "x_clone")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated MiB of fp32 input "
                   "(default: 1,4,16,64 on CPU, 1,4,16,64,256,1024 on GPU; 1,4 with --quick)")
    p.add_argument("--bits", default="1,2,4,8", help="comma-separated bit widths")
    p.add_argument("--group", type=int, default=quant.DEFAULT_GROUP, help="group size")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--out", default="results", help="output folder; files go to OUT/<device-tag>/")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steadier on a shared machine, and CPU figures are ratios)")
    p.add_argument("--quick", action="store_true", help="smoke run: sizes 1,4 MiB and few repeats")
    args = p.parse_args(argv)
    if args.sizes is None:
        full = "1,4,16,64,256,1024" if args.device.startswith("cuda") else "1,4,16,64"
        args.sizes = "1,4" if args.quick else full
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.bits = [int(b) for b in args.bits.split(",")]
    for bits in args.bits:
        quant.check_format(bits, args.group)
    return args


def device_tag(device: torch.device) -> str:
    """``cpu``, or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def make_timer(device: torch.device, quick: bool) -> Callable[[Callable[[], object]], float]:
    """A function timing ``fn()`` in milliseconds (median)."""
    if device.type == "cuda":
        import triton.testing

        def gpu_time(fn: Callable[[], object]) -> float:
            return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                           return_mode="median")
        return gpu_time

    budget_s, max_runs = (0.3, 20) if quick else (2.0, 100)

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()  # warm up (first touch of fresh outputs, lazy initialisation)
        fn()
        runs: list[float] = []
        began = time.perf_counter()
        while len(runs) < 5 or (len(runs) < max_runs and time.perf_counter() - began < budget_s):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)
    return cpu_time


def triton_skip_reason(device: torch.device) -> str | None:
    """Why the hand-written Triton kernels are not timed here, or None when they are."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: interpreter timings are meaningless"
    if device.type != "cuda":
        return "the Triton kernels need a GPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def bench_size(size_mib: int, bits_list: list[int], group: int, device: torch.device,
               timer: Callable[[Callable[[], object]], float], triton_ok: bool) -> list[dict]:
    """Rows for one size: the copy and the clone, then compress / decompress for each bit width and path."""
    n = size_mib * MIB // 4
    x = torch.randn(n, device=device)
    copy_ms = timer(functools.partial(torch.empty_like(x).copy_, x))  # the buffer lives as long as the timer
    clone_ms = timer(x.clone)
    rows = [dict(size_mib=size_mib, bits="", group="", op="copy", path=path, ms=ms, gbps=2 * n * 4 / ms / 1e6)
            for path, ms in (("copy", copy_ms), ("clone", clone_ms))]
    for bits in bits_list:
        rows += bench_bits(x, bits, group, timer, triton_ok)
    for r in rows:
        r["size_mib"] = size_mib
        r["x_copy"], r["x_clone"] = r["gbps"] / rows[0]["gbps"], r["gbps"] / rows[1]["gbps"]
    return rows


def bench_bits(x: torch.Tensor, bits: int, group: int, timer: Callable[[Callable[[], object]], float],
               triton_ok: bool) -> list[dict]:
    """compress / decompress of ``x`` at ``bits``: Inductor, then Triton where it runs."""
    n = x.numel()
    raw = n * 4
    packed = quant.compressed_bytes(n, bits, group, torch.float32)
    rows = []

    def row(op: str, path: str, fn: Callable[[], object], nbytes: int) -> None:
        ms = timer(fn)
        rows.append(dict(bits=bits, group=group, op=op, path=path, ms=ms, gbps=nbytes / ms / 1e6))

    torch.compiler.reset()  # a fresh compile per (size, bits): static shapes, no recompile limit
    compress = torch.compile(lambda t, s: quant.quantize(t, bits, group, seed=s), dynamic=False)
    philox = torch.compile(lambda t: quant.quantize(t, bits, group), dynamic=False)
    decompress = torch.compile(lambda c, m: quant.dequantize(c, m, bits, n, torch.float32), dynamic=False)
    seed = torch.tensor(12345, dtype=torch.int64, device=x.device)
    codes, meta = compress(x, seed)
    row("compress", "inductor", lambda: compress(x, seed), raw + packed)
    row("compress", "philox", lambda: philox(x), raw + packed)
    row("decompress", "inductor", lambda: decompress(codes, meta), packed + raw)

    if triton_ok:
        from actc.kernels.triton_dequantize import triton_dequantize
        from actc.kernels.triton_quantize import triton_quantize

        codes, meta = triton_quantize(x, bits, group, seed=0)
        row("compress", "triton", lambda: triton_quantize(x, bits, group, seed=0), raw + packed)
        row("decompress", "triton", lambda: triton_dequantize(codes, meta, bits, n, torch.float32), packed + raw)
    return rows


def print_table(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'MiB':>6} {'bits':>4} {'op':>10} {'path':>9} {'ms':>9} {'GB/s':>8} {'x copy':>7} {'x clone':>8}")
    for r in rows:
        print(f"{r['size_mib']:>6} {r['bits'] or '-':>4} {r['op']:>10} {r['path']:>9} "
              f"{r['ms']:>9.3f} {r['gbps']:>8.1f} {r['x_copy']:>7.2f} {r['x_clone']:>8.2f}", flush=True)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})


GPU_GOAL = 0.8  # of copy bandwidth at >= 64 MiB, both ops
CPU_GOALS = {"compress": 0.3, "decompress": 0.5}  # issue 15: of copy bandwidth at 64 MiB, one thread
BASELINE = {"compress": "x_copy", "decompress": "x_clone"}  # like with like (module docstring)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Top: GB/s against size, one panel per op, one line per (path, bits), the copy and the clone in each.
    Bottom: the same as a fraction of the baseline's bandwidth (BASELINE: the copy's for compress, the
    clone's for decompress), with the goal."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey="row")
    copy = sorted((r["size_mib"], r["gbps"]) for r in rows if r["path"] == "copy")
    clone = sorted((r["size_mib"], r["gbps"]) for r in rows if r["path"] == "clone")
    cpu = rows[0]["device"] == "cpu"
    for col, op in enumerate(("compress", "decompress")):
        top, bottom = axes[0][col], axes[1][col]
        top.plot(*zip(*copy), "k--", label="copy")
        top.plot(*zip(*clone), "k-.", label="clone")
        goal = CPU_GOALS[op] if cpu else GPU_GOAL
        bottom.axhline(goal, color="k", linestyle="--", label=f"goal: {goal:.0%}")
        bottom.set_ylabel(f"fraction of {BASELINE[op][2:]} bandwidth")
        for path_name, bits in sorted({(r["path"], r["bits"]) for r in rows if r["op"] == op}):
            mine = sorted((r["size_mib"], r["gbps"], r[BASELINE[op]]) for r in rows
                          if r["op"] == op and r["path"] == path_name and r["bits"] == bits)
            style = dict(marker="o", linestyle="-" if path_name == "triton" else ":", label=f"{path_name} {bits}-bit")
            top.plot([m[0] for m in mine], [m[1] for m in mine], **style)
            bottom.plot([m[0] for m in mine], [m[2] for m in mine], **style)
        top.set_yscale("log")
        top.set_title(op)
        bottom.set_xscale("log", base=2)
        bottom.set_xlabel("input size (MiB of fp32)")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("GB/s (read + written)")
    axes[0][0].legend(fontsize=8)
    axes[0][1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    tag = device_tag(device)
    timer = make_timer(device, args.quick)
    reason = triton_skip_reason(device)
    if reason:
        print(f"triton path skipped: {reason}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        print(f"CPU ({torch.get_num_threads()} threads): timings are for ratios only")
    rows = []
    print_table([])  # the header; each size's rows follow as they are measured
    for size in args.sizes:
        measured = bench_size(size, args.bits, args.group, device, timer, reason is None)
        print_table(measured, header=False)
        rows += measured
    for r in rows:
        r["device"] = tag
    out = Path(args.out) / tag
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "kernels.csv")
    plotted = plot(rows, out / "kernels.png", f"quantize / dequantize vs copy, group {args.group}, {tag}")
    print(f"wrote {out / 'kernels.csv'}" + (f" and {out / 'kernels.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
