"""`actc demo`: a small transformer LM trained on generated data, inductor against actc, side by side.

Each mode trains the same model from the same seed on the same batches. Saved MiB is measured with
``saved_tensors_hooks`` on one step (unique storages; parameters and inputs left out). Step time is the
median over the steps after two warm-up steps, as a ratio to inductor: CPU times are only comparable as ratios.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from actc.measure import saved_bytes
from actc.models import TinyGPT, copy_task, lm_loss

CONFIG = dict(vocab=64, width=128, layers=2, heads=4, context=64)
BATCH = 16


def train(backend: str, options: dict | None, steps: int) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kwargs = {"options": options} if options is not None else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(1)
    batches = [copy_task(BATCH, CONFIG["context"], CONFIG["vocab"], gen) for _ in range(steps)]
    times, loss = [], None
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = lm_loss(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if step == 0:
            compile_s = time.perf_counter() - start
    x, y = batches[0]
    exclude = (*model.parameters(), x, y)
    nbytes, out = saved_bytes(lambda: lm_loss(compiled(x), y), exclude)
    out.backward()
    opt.zero_grad(set_to_none=True)
    return {"saved": nbytes, "step": statistics.median(times[2:]), "loss": loss.item(), "compile": compile_s}


def run_demo(steps: int = 30, budgets=("8bit", "4bit", "2bit")) -> int:
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    print(f"actc demo: TinyGPT {CONFIG}, batch {BATCH}, {steps} steps of AdamW on a generated copy task")
    rows = [("inductor", train("inductor", None, steps))]
    for budget in budgets:
        rows.append((f"actc {budget}", train("actc", {"memory_budget": budget}, steps)))
    base = rows[0][1]
    print(f"\n{'mode':<14}{'saved MiB':>10}{'x less':>8}{'step ratio':>12}{'compile s':>11}{'final loss':>12}")
    for name, r in rows:
        print(f"{name:<14}{r['saved'] / 2**20:>10.2f}{base['saved'] / max(r['saved'], 1):>8.1f}"
              f"{r['step'] / base['step']:>12.2f}{r['compile']:>11.1f}{r['loss']:>12.4f}")
    return 0
