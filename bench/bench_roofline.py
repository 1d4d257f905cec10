"""A GPU step-time estimate the CPU can produce: a roofline over the Triton code Inductor generates for the GPU.

Why. A GPU is rarely lent to this project, but what actc costs a GPU user is mostly memory traffic: each
kernel that compression adds, and each byte a fused kernel moves beyond Inductor's, is time on a
bandwidth-bound device. This bench generates the Triton path of one training step on the CPU (tests/triton_cpu.py,
kernels generated, none run) and prices every scheduled node the way Inductor's own GPU estimate does
(``BaseSchedulerNode._get_estimated_runtime``): max(FLOPs / peak FLOP/s, bytes read and written / bandwidth),
FLOPs from ``estimate_flops()`` (matmuls, convolutions, attention; 0 for generated pointwise and reduction
kernels) and bytes from ``get_read_write_buffers_sizes()``, both Inductor's accounting after fusion. It is an
ESTIMATE of an H100, not a measurement: no launch latency, no cache reuse between kernels, every kernel at
full bandwidth, every matmul at peak.

Device model (H100 SXM): 3.0 TB/s of sustained bandwidth (issue 15; the datasheet's 3.35 is a peak), and dense
peaks from Inductor's own table (torch/_inductor/analysis/device_info.py, its sparse Tensor-Core figures
halved): fp32 67 TFLOP/s (torch's default matmul precision, "ieee"), TF32 495 (``fp32_precision="tf32"``),
bf16 / fp16 990.

Models: bench_compile.py's random-init transformers causal and masked LMs (4 layers) and its ConvNet, one
forward-loss-backward step each, fp32, at sizes nearer a GPU's than bench_compile's (the code is generated,
never run, so size costs little here): width 512 (heads of 64, MLP 2048), sequence 512, batch 8; the
ConvNet at batch 128. At bench_compile's sizes (width 128, sequence 128) a GPU step is a few hundred
microseconds, where launch latency, which a roofline leaves out, would dominate. Modes, by their names in
common.MODES: "inductor" (torch's defaults, no recompute budget), "inductor recompute 0.3" (Inductor's
recompute budget alone), "actc default" (``backend="actc"``, no options: that budget of 0.3 and 2 bits),
"actc recompute 0.5" and "actc recompute 0.1" (the default at other recompute budgets) and "actc 2bit"
(``recompute=1.0``: nothing recomputed beyond Inductor's usual).

Columns.
  launches    scheduled nodes that run: generated kernels plus extern calls (matmuls, convolutions, attention,
              the random seed), forward and backward.
  MB moved    the bytes all of them read and write.
  GFLOP       their FLOPs (extern calls).
  est ms      the roofline time with fp32 matmuls at 67 TFLOP/s; est x: over "inductor"'s for the same model.
  tf32 ms     the same with fp32 matmuls at TF32's 495 TFLOP/s (more of the step is then memory-bound, so
              added bytes weigh more); tf32 x: over "inductor"'s.

    python bench/bench_roofline.py [--models qwen2,...,convnet] [--modes "inductor,actc default"]
                                   [--width 512] [--seq 512] [--batch 8] [--cnn-batch 128] [--out results]

Prints a table and writes <out>/cpu/roofline.csv and roofline.png (rows of other (model, mode) pairs kept).
The script sets TRITON_INTERPRET=1 itself, before triton is imported. About a minute per (model, mode).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (tests/triton_cpu.py)

import torch  # noqa: E402

import common  # noqa: E402
from bench_compile import MODELS, workload  # noqa: E402

sys.path.insert(0, str(common.REPO / "tests"))
import triton_cpu  # noqa: E402

BANDWIDTH = 3.0e12  # bytes/s
PEAK = {torch.float32: 67e12, torch.bfloat16: 989.5e12, torch.float16: 989.5e12}  # FLOP/s, dense
TF32 = 494.5e12
MODES = ["inductor", "inductor recompute 0.3", "actc default", "actc recompute 0.5", "actc recompute 0.1",
         "actc 2bit"]
FIELDS = ("device", "model", "mode", "launches", "kernels", "externs", "mb_moved", "gflop", "est_ms", "est_x",
          "tf32_ms", "tf32_x", "note")


def roofline_seconds(nodes: list[dict], fp32_peak: float = PEAK[torch.float32]) -> float:
    """Sum over nodes of max(FLOPs / peak, bytes / bandwidth): Inductor's per-node GPU estimate."""
    total = 0.0
    for n in nodes:
        peak = fp32_peak if n["dtype"] in (torch.float32, None) else PEAK.get(n["dtype"], fp32_peak)
        total += max(n["flops"] / peak, n["bytes"] / BANDWIDTH)
    return total


def measure(model_name: str, mode_name: str, args: argparse.Namespace) -> dict:
    """Generate (not run) one step's Triton code under the mode and price its scheduled nodes."""
    mode = common.MODES[mode_name]
    model, (x, y) = workload(model_name, args.width, args.seq, args.batch if MODELS[model_name] else args.cnn_batch)
    with common.actc_warnings() as warned, common.mode_config(mode), triton_cpu.triton_backend(execute=False), \
            triton_cpu.scheduled_nodes() as nodes:
        compiled = common.compile_for(model, mode)
        compiled(x, y).backward()
    kernels = sum(n["kind"] == "kernel" for n in nodes)
    return dict(model=model_name, mode=mode_name, launches=len(nodes), kernels=kernels, externs=len(nodes) - kernels,
                mb_moved=sum(n["bytes"] for n in nodes) / 1e6, gflop=sum(n["flops"] for n in nodes) / 1e9,
                est_ms=roofline_seconds(nodes) * 1e3, tf32_ms=roofline_seconds(nodes, TF32) * 1e3,
                note="; ".join(dict.fromkeys(warned)))


def add_ratios(rows: list[dict]) -> None:
    """est x and tf32 x over the same model's "inductor" row, that row included (1.0: its bar in the plot,
    where bench_compile's ratios leave the baseline out)."""
    for r in rows:
        base = common.baseline(rows, r)
        for ratio, key in (("est_x", "est_ms"), ("tf32_x", "tf32_ms")):
            r[ratio] = r[key] / base[key] if base is not None and r.get(key) and base.get(key) else None


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """est x and tf32 x per model, one bar per mode."""
    return common.grouped_bars(rows, [("est_x", "estimated step time x inductor (fp32 at 67 TFLOP/s)"),
                                      ("tf32_x", "estimated step time x inductor (TF32 at 495 TFLOP/s)")],
                               path, title, reference=1.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated names from common.MODES")
    p.add_argument("--width", type=int, default=512, help="transformers' width (heads of 64)")
    p.add_argument("--seq", type=int, default=512, help="transformers' sequence length")
    p.add_argument("--batch", type=int, default=8, help="transformers' batch")
    p.add_argument("--cnn-batch", type=int, default=128, help="the ConvNet's batch")
    p.add_argument("--out", default=str(common.REPO / "results"), help="files go to OUT/cpu/")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    models = common.select_names(MODELS, args.models)
    modes = common.select_modes(args.modes)
    tag = common.device_tag(torch.device("cpu"))
    print(f"bench_roofline on {common.machine()}: an H100 roofline ESTIMATE from Triton code generated on the CPU")
    rows = []
    for model in models:
        for mode in modes:
            print(f"{model} / {mode} ...", flush=True)
            rows.append(dict(device=tag, **measure(model, mode, args)))
    out = Path(args.out) / tag
    rows = common.merge_csv(out / "roofline.csv", rows, ("model", "mode"))
    common.sort_rows(rows, MODELS, MODES)
    add_ratios(rows)
    print()
    common.print_table(rows, [("model", "model", ""), ("mode", "mode", ""), ("launches", "launches", "d"),
                              ("MB moved", "mb_moved", ".1f"), ("GFLOP", "gflop", ".2f"), ("est ms", "est_ms", ".3f"),
                              ("est x", "est_x", ".2f"), ("tf32 ms", "tf32_ms", ".3f"), ("tf32 x", "tf32_x", ".2f")])
    for r in rows:
        if r.get("note"):
            print(f"  {r['model']} / {r['mode']}: {r['note']}")
    common.write_csv(rows, out / "roofline.csv", FIELDS)
    plotted = plot(rows, out / "roofline.png", f"H100 roofline estimate of one training step (not a measurement); "
                                               f"code generated on {common.machine()}")
    print(f"wrote {out / 'roofline.csv'}" + (f" and {out / 'roofline.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
