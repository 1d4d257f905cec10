"""`actc demo`: a small transformer LM trained with inductor and with actc, side by side, in a few minutes.

The task is one the model learns within a hundred steps: each sequence counts from a random start with a
random stride (x, x+s, x+2s, ... mod vocab), so after two tokens every next token is determined. The loss
starts at ln(vocab) and falls towards zero; if compression hurt learning, actc's loss would stay above
inductor's. Every mode trains the same model from the same seed on the same batches.

Saved MiB is measured with ``saved_tensors_hooks`` on one step (unique storages; parameters and inputs left
out). Step time is the median over the steps after two warm-up steps, as a ratio to inductor's: on a CPU
only ratios are comparable.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time

import torch

from actc.measure import saved_bytes
from actc.models import TinyGPT, counting_task, lm_loss

CONFIG = dict(vocab=32, width=64, layers=2, heads=4, context=32)
BATCH = 32
LR = 1e-2


@contextlib.contextmanager
def heartbeat(name: str, every: float = 10.0):
    """Print a line every ``every`` seconds while the block runs: a first compile takes a minute or more."""
    done, start = threading.Event(), time.perf_counter()

    def beat():
        while not done.wait(every):
            print(f"{name}: still compiling ({time.perf_counter() - start:.0f} s)", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def train(name: str, backend: str, options: dict | None, steps: int) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    compiled = torch.compile(model, backend=backend, **({"options": options} if options is not None else {}))
    gen = torch.Generator().manual_seed(1)
    batches = [counting_task(BATCH, CONFIG["context"], CONFIG["vocab"], gen) for _ in range(steps)]
    print(f"{name}: compiling ...", flush=True)
    times, losses = [], []
    every = max(1, steps // 4)
    for step, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        with heartbeat(name) if step == 0 else contextlib.nullcontext():
            loss = lm_loss(compiled(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 0:
            print(f"{name}: compiled in {times[0]:.0f} s (forward and backward)", flush=True)
        if (step + 1) % every == 0 or step + 1 == steps:
            print(f"{name}: step {step + 1}/{steps}  loss {losses[-1]:.3f}", flush=True)
    x, y = batches[0]
    nbytes, out = saved_bytes(lambda: lm_loss(compiled(x), y), (*model.parameters(), x, y))
    out.backward()
    return {"saved": nbytes, "step": statistics.median(times[2:]), "compile": times[0],
            "loss": statistics.mean(losses[-10:])}


def run_demo(steps: int = 120, budgets=("2bit",)) -> int:
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    print(f"actc demo: TinyGPT {CONFIG}, batch {BATCH}, {steps} AdamW steps on a counting task "
          f"(loss starts at ln {CONFIG['vocab']} = {math.log(CONFIG['vocab']):.2f})\n", flush=True)
    rows = [("inductor", train("inductor", "inductor", None, steps))]
    for budget in budgets:
        name = f"actc {budget}"
        rows.append((name, train(name, "actc", {"memory_budget": budget}, steps)))
    base = rows[0][1]
    print(f"\n{'mode':<14}{'saved MiB':>10}{'x less':>8}{'step ratio':>12}{'compile s':>11}{'loss':>8}")
    for name, r in rows:
        print(f"{name:<14}{r['saved'] / 2**20:>10.2f}{base['saved'] / max(r['saved'], 1):>8.1f}"
              f"{r['step'] / base['step']:>12.2f}{r['compile']:>11.0f}{r['loss']:>8.3f}")
    print("\nsaved MiB: activations kept for the backward (x less: inductor's over this row's); "
          "step ratio: median step over inductor's.\ncompile s: the first step; loss: mean of the last 10 "
          "steps (near inductor's: compression did not hurt learning).")
    return 0
