"""Compile time and generated code: Inductor against actc under its default options
(``torch.compile(model, backend="actc")``, options=None), on the CPU. A third mode, "inductor recompute 0.3",
is Inductor under the recompute budget that actc's default sets (torch._functorch.config
.activation_memory_budget): the budget changes what the partition saves, so the kernels Inductor generates,
and this row tells that cost from compression's. "actc unpatched" (only when named in --modes) is actc without
its patch of Inductor's per-op dtype-rule setup (actc/_torch_compat.py), to measure what the patch saves.

Models. Random-init transformers models built from their configs (no download): the causal LMs qwen2, mistral,
phi and gemma and the masked LMs distilbert and roberta, each 4 layers, width 128, 4 heads (4 kv heads where the
config has them), intermediate size 512, vocabulary 1024, sequence 128, batch 8, fp32, loss computed by the model;
and convnet, bench_train.py's "cnn" (actc.models.ConvNet, 32 channels, 3x32x32 images, batch 32).

Each (model, mode) is measured in fresh processes (this script with the hidden --child flag, which prints one
JSON line), so no compiled graph, cache or import is shared between measurements. One step is forward, loss
and backward, timed from the first call of the compiled module to the end of the backward, so it holds dynamo's
trace, AOTAutograd, actc's planning, Inductor's code generation and the C++ compiles (with Inductor's default
compile workers), and any import done lazily on the way; building the model and the batch is not timed.
  cold s      the first step with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 (and an empty TORCHINDUCTOR_CACHE_DIR).
  warm s      the first step in a fresh process, caches enabled, after another process ran the same step with
              the same private TORCHINDUCTOR_CACHE_DIR (a temporary folder per model and mode): a rerun of
              a user's script: the median of WARM_SAMPLES such processes (cold: one sample). warm hit: the cache hits
              of that median process, AOTAutograd's and the FX graph
              cache's (hits / lookups, then the lookups that bypassed the cache, which does not take the
              graph; "aot 1/1 fx 2/2" is one forward-backward graph served whole).
  kernels     kernels in the code the cold process generated (torch._inductor.utils.run_and_get_code around
              its step): the `name = async_compile.cpp_pybinding(...)` definitions, one per fused C++ kernel.
  code lines  non-empty lines of that code: the Python wrappers of forward and backward with their C++ kernels.
  graphs      (CSV) how many wrappers it generated: 2 per graph dynamo captured, more after a graph break.
  phases      where the cold step's seconds go, from the timers Inductor keeps for its own phases
              (torch._dynamo.utils.compilation_time_metrics, summed over forward and backward): partition
              (actc's partitioner, Inductor's min-cut inside it, or the min-cut alone), lowering (FX graph to
              Inductor's IR), codegen (scheduling, fusion and writing the kernels' C++ or Triton source: Python
              time), compiler (waiting for the C++ compiler and loading the kernels), other (dynamo's trace,
              AOTAutograd, running the step: the rest of cold s). Printed as a second table.
  ... x       actc's figure over Inductor's for the same model: cold x, warm x, code x (and triton x).
  triton      with --triton, one more process: the same step compiled with Inductor's Triton backend on the
              CPU, the code GPU users get (tests/triton_cpu.py; TRITON_INTERPRET=1, kernels loaded, none run):
              its kernels (`name = async_compile.triton(...)`, each one @triton.jit) and non-empty lines.
The goals printed under the table (issue 15): cold <= 1.3x Inductor's, warm <= 1.1x, generated code <= 1.5x.

    python bench/bench_compile.py [--models qwen2,mistral,phi,gemma,distilbert,roberta,convnet]
                                  [--modes inductor,"inductor recompute 0.3",actc,"actc unpatched"] [--threads 1]
                                  [--out results] [--triton]

Prints a table and writes <out>/cpu/compile.csv and compile.png. A run replaces the rows of the (model, mode)
pairs it measured and keeps the others, so the models can be measured one or a few at a time. On a machine
shared with other jobs the times are only indicative: cold s is one sample.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
import loaders
from bench_train import WORKLOADS

SEQ, BATCH, VOCAB = 128, 8, 1024
SIZE = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=VOCAB,
            max_position_embeddings=2 * SEQ)
KV = dict(num_key_value_heads=4)
# name -> (transformers model_type, masked LM, config fields beyond SIZE); None: bench_train's "cnn"
MODELS = {
    "qwen2": ("qwen2", False, KV),
    "mistral": ("mistral", False, KV),
    "phi": ("phi", False, KV),
    "gemma": ("gemma", False, dict(KV, head_dim=32)),  # Gemma's default head_dim is 256, whatever the width
    "distilbert": ("distilbert", True, dict(hidden_dim=512)),  # DistilBERT's name for intermediate_size
    "roberta": ("roberta", True, {}),
    "convnet": None,
}
# mode: (backend, Inductor's recompute budget or None for torch's own). "inductor recompute 0.3" is Inductor
# under the recompute budget actc's default runs it at: what the budget costs apart from compression
UNPATCHED = "actc unpatched"  # opt-in (--modes): without _torch_compat.skip_repeated_dtype_rule_setup
MODES = {"inductor": ("inductor", None), "inductor recompute 0.3": ("inductor", 0.3), "actc": ("actc", None),
         UNPATCHED: ("actc", None)}
GOALS = [("cold", "cold_x", 1.3), ("warm", "warm_x", 1.1), ("generated code", "code_x", 1.5)]
# (column, Inductor's timer names): the first timer present is the phase's time (2.13: the custom
# partitioner's timer holds the min-cut's, so the two are never added)
PHASES = (("partition_s", ("ActcPartitioner", "min_cut_rematerialization_partition")),
          ("lowering_s", ("GraphLowering.run",)), ("codegen_s", ("GraphLowering.codegen",)),
          ("compiler_s", ("PyCodeCache.load_by_key_path",)))
FIELDS = ("device", "model", "mode", "cold_s", "cold_x", "warm_s", "warm_x", "warm_hit", "kernels", "code_lines",
          "code_x", "graphs", *(c for c, _ in PHASES), "other_s", "triton_kernels", "triton_lines", "triton_x", "threads", "note")
KERNEL = re.compile(r"^\w+ = async_compile\.cpp_pybinding\(", re.M)
CHILD_TIMEOUT_S = 1800
WARM_SAMPLES = 3  # a warm step is 2-5 s, where one process's noise was 0.5 s (1.14x in one run, 1.04x over 3)


class Loss(torch.nn.Module):
    """forward(x, y) -> the scalar loss, as common.LossOf computes it but with no autocast block: dynamo puts
    even a disabled one in the graph, and AOTAutograd's cache bypasses graphs that enter autocast, which would
    leave the warm figures without that cache's hits."""

    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":
            return self.model(input_ids=x, labels=y).loss
        return torch.nn.functional.cross_entropy(self.model(x), y)


def workload(name: str, width: int | None = None, seq: int = SEQ, batch: int | None = None
             ) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """(the model wrapped so that it returns its loss, (x, y)), seeded. The sizes default to those above;
    ``width`` (a multiple of 64) widens the transformers to heads of 64 and an MLP of 4x the width."""
    torch.manual_seed(0)
    if MODELS[name] is None:
        work = WORKLOADS["cpu"]["cnn"]
        return Loss(work["build"]().train(), work["kind"]), work["inputs"](batch or work["batch"])
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    model_type, masked, extra = MODELS[name]
    fields = {**SIZE, **extra, "max_position_embeddings": 2 * seq}
    if width is not None:
        heads = width // 64
        fields.update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads)
        fields.update({k: {"num_key_value_heads": heads, "head_dim": 64, "hidden_dim": 4 * width}[k]
                       for k in extra})
    if "hidden_dim" in extra:
        del fields["intermediate_size"]
    config = AutoConfig.for_model(model_type, **fields)
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return Loss(model.train(), "hf"), loaders.token_batch(batch or BATCH, seq, VOCAB, masked)


def nonempty_lines(codes: list[str]) -> int:
    return sum(1 for code in codes for line in code.splitlines() if line.strip())


def child(args: argparse.Namespace) -> dict:
    """One fresh process: build, compile and time (or generate Triton code for) one first step."""
    torch.set_num_threads(args.threads)
    wrapped, (x, y) = workload(args.models)
    backend, budget = MODES[args.modes]
    if args.modes == UNPATCHED:
        from actc import _torch_compat

        _torch_compat.skip_repeated_dtype_rule_setup = lambda: None
    with torch._functorch.config.patch(activation_memory_budget=budget) if budget else contextlib.nullcontext():
        return _first_step(args, backend, wrapped, x, y)


def _first_step(args: argparse.Namespace, backend: str, wrapped: torch.nn.Module, x, y) -> dict:
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    if args.child == "triton":
        sys.path.insert(0, str(common.REPO / "tests"))
        import triton_cpu

        codes = triton_cpu.forward_backward_code(wrapped, (x, y), backend, loss=lambda loss: loss)
        return dict(triton_kernels=sum(len(triton_cpu.kernels(c)) for c in codes), triton_lines=nonempty_lines(codes))
    compiled = torch.compile(wrapped, backend=backend)
    torch.manual_seed(1)

    def step() -> float:
        loss = compiled(x, y)
        loss.backward()
        return loss.item()

    t0 = time.perf_counter()
    if args.child == "cold":
        loss, codes = run_and_get_code(step)
    else:
        loss, codes = step(), []
    seconds = time.perf_counter() - t0
    row = dict(seconds=seconds, loss=loss, aot=dict(counters["aot_autograd"]), fx=dict(counters["inductor"]))
    if codes:
        row.update(kernels=sum(len(KERNEL.findall(c)) for c in codes), code_lines=nonempty_lines(codes),
                   graphs=len(codes), phases=phases())
    return row


def phases() -> dict[str, float]:
    """Seconds per phase of this process's compiles (see PHASES), from Inductor's own timers (2.13)."""
    from torch._dynamo.utils import compilation_time_metrics as timers

    got = {}
    for column, names in PHASES:
        name = next((n for n in names if n in timers), None)
        got[column] = sum(timers[name]) if name else 0.0
    return got


def spawn(args: argparse.Namespace, kind: str, model: str, mode: str, cache_dir: str) -> dict:
    """Run one --child process; its JSON line, or {"error": ...}."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_FORCE_DISABLE_CACHES"}
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    if kind in ("cold", "triton"):
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    if kind == "triton":  # Triton's interpreter: the only Triton target on a CPU, needed to load the kernels
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, __file__, "--child", kind, "--models", model, "--modes", mode,
           "--threads", str(args.threads)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"{kind}: timed out after {CHILD_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{kind}: exit {done.returncode}: {last[:200]}"}
    return json.loads(lines[-1])


def hits(got: dict) -> str:
    """'aot 1/1 fx 2/2': cache hits over lookups (hits, misses and bypasses) in one process, then the bypasses."""
    parts = []
    for name, key in (("aot", "autograd_cache"), ("fx", "fxgraph_cache")):
        hit, miss, bypass = (got.get(name, {}).get(f"{key}_{k}", 0) for k in ("hit", "miss", "bypass"))
        parts.append(f"{name} {hit}/{hit + miss + bypass}" + (f" ({bypass} bypassed)" if bypass else ""))
    return " ".join(parts)


def measure(args: argparse.Namespace, model: str, mode: str) -> dict:
    """cold (with the generated code), fill then warm in one private cache folder, and maybe triton."""
    row, errors = dict(model=model, mode=mode, threads=args.threads), []
    with tempfile.TemporaryDirectory(prefix="actc-cold-") as cold_dir, \
            tempfile.TemporaryDirectory(prefix="actc-warm-") as warm_dir:
        cold = spawn(args, "cold", model, mode, cold_dir)
        row.update(cold_s=cold.get("seconds"), kernels=cold.get("kernels"), code_lines=cold.get("code_lines"),
                   graphs=cold.get("graphs"), **cold.get("phases", {}))
        if "phases" in cold:
            row["other_s"] = cold["seconds"] - sum(cold["phases"].values())
        fill = spawn(args, "fill", model, mode, warm_dir)
        warms = [spawn(args, "warm", model, mode, warm_dir) for _ in range(WARM_SAMPLES)] if "error" not in fill else []
        timed = sorted((w for w in warms if "seconds" in w), key=lambda w: w["seconds"])
        warm = timed[len(timed) // 2] if len(timed) == WARM_SAMPLES else {}  # the median process
        row.update(warm_s=warm.get("seconds"), warm_hit=hits(warm) if warm else None)
        errors += [r["error"] for r in (cold, fill, *warms) if "error" in r]
        if args.triton:
            triton = spawn(args, "triton", model, mode, cold_dir)
            row.update({k: triton.get(k) for k in ("triton_kernels", "triton_lines")})
            errors += [triton["error"]] if "error" in triton else []
    row["note"] = "; ".join(errors)
    return row


def add_ratios(rows: list[dict]) -> None:
    """actc's (any non-inductor mode's) figures over Inductor's for the same model."""
    for r in rows:
        base = common.baseline(rows, r)
        if base is None or r is base:
            continue
        for ratio, key in (("cold_x", "cold_s"), ("warm_x", "warm_s"), ("code_x", "code_lines"),
                           ("triton_x", "triton_lines")):
            if r.get(key) and base.get(key):
                r[ratio] = r[key] / base[key]


def print_goals(rows: list[dict]) -> None:
    for label, key, limit in GOALS:
        got = [(r[key], r["model"]) for r in rows if r["mode"] == "actc" and r.get(key) is not None]
        if not got:
            continue
        met = sum(v <= limit for v, _ in got)
        worst, where = max(got)
        print(f"goal: {label} <= {limit}x inductor's: {'met' if met == len(got) else 'NOT met'} (met on {met} of "
              f"{len(got)} model(s); worst {worst:.2f}x, {where})")


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Three panels: cold s, warm s and code lines per model, one bar per mode."""
    return common.grouped_bars(rows, [("cold_s", "cold first step, s"), ("warm_s", "warm first step, s"),
                                      ("code_lines", "generated code, non-empty lines")], path, title)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    default_modes = ",".join(m for m in MODES if m != UNPATCHED)
    p.add_argument("--modes", default=default_modes, help=f"comma-separated from {', '.join(MODES)} (default: {default_modes})")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each measuring process")
    p.add_argument("--out", default=str(common.REPO / "results"), help="files go to OUT/cpu/")
    p.add_argument("--triton", action="store_true", help="also count Inductor's Triton code (generated on the CPU)")
    p.add_argument("--child", choices=("cold", "fill", "warm", "triton"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    models = common.select_names(MODELS, args.models)
    modes = common.select_names(MODES, args.modes)
    tag = common.device_tag(torch.device("cpu"))
    torch.set_num_threads(args.threads)
    print(f"bench_compile on {common.machine()}; one process per figure; cold one sample, warm the median of {WARM_SAMPLES}")
    rows = []
    for model in models:
        for mode in modes:
            print(f"{model} / {mode} ...", flush=True)
            rows.append(dict(device=tag, **measure(args, model, mode)))
            if rows[-1]["note"]:
                print(f"  {rows[-1]['note']}")
    out = Path(args.out) / tag
    rows = common.merge_csv(out / "compile.csv", rows, ("model", "mode"))
    common.sort_rows(rows, MODELS, MODES)
    add_ratios(rows)
    columns = [("model", "model", ""), ("mode", "mode", ""), ("cold s", "cold_s", ".1f"), ("cold x", "cold_x", ".2f"),
               ("warm s", "warm_s", ".1f"), ("warm x", "warm_x", ".2f"), ("warm hit", "warm_hit", ""),
               ("kernels", "kernels", "d"), ("code lines", "code_lines", "d"), ("code x", "code_x", ".2f")]
    if any(r.get("triton_lines") for r in rows):
        columns += [("triton kernels", "triton_kernels", "d"), ("triton lines", "triton_lines", "d"),
                    ("triton x", "triton_x", ".2f")]
    print()
    common.print_table(rows, columns)
    for r in rows:
        if r.get("note"):
            print(f"  {r['model']} / {r['mode']}: {r['note']}")
    print_goals(rows)
    print("\nwhere the cold step's seconds go:")
    common.print_table([r for r in rows if r.get("codegen_s") is not None],
                       [("model", "model", ""), ("mode", "mode", ""), ("cold s", "cold_s", ".1f"),
                        *((c.removesuffix("_s"), c, ".1f") for c, _ in PHASES), ("other", "other_s", ".1f")])
    common.write_csv(rows, out / "compile.csv", FIELDS)
    plotted = plot(rows, out / "compile.png", f"first training step's compile, {tag}: {common.machine()}")
    print(f"wrote {out / 'compile.csv'}" + (f" and {out / 'compile.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
