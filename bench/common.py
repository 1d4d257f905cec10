"""What the benches share: the mode table, the loss wrapper, the small CNN, and CSV / PNG / table writing.
Not a script; the benches import it (models and data: loaders.py).

A mode is plain data: a name mapped to a dict with
  backend    None (plain eager, no torch.compile), "inductor" or "actc"
  options    the dict handed to torch.compile(options=...) (actc's options), or absent
  recompute  torch._functorch.config.activation_memory_budget for the compile (Inductor's recompute budget;
             actc rows pass actc's own "recompute" option instead, which keeps dropout's draws saved)
  fp8        True: PyTorch's fp8 activation pass (post_grad_fusion_options["activation_quantization_aten_pass"])
Adding a row is one line in MODES, e.g. "actc 2bit static" below. Rows without an "allocation" option get
actc's default allocation, "static" (one plan, never re-planned). The adaptive rows name it: bits
re-planned from measured sensitivities after warmup_steps backward passes and every replan_every after that,
the changed graphs recompiling.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch._functorch.config  # noqa: F401  (mode_config patches these before anything compiles)
import torch._inductor.config  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------ modes
NEVER = 10**9  # a warmup_steps no run reaches: the statistics are measured every step, no re-plan comes
MODES: dict[str, dict[str, Any]] = {
    "eager": dict(backend=None),
    "inductor": dict(backend="inductor"),
    "inductor recompute 0.3": dict(backend="inductor", recompute=0.3),
    "inductor fp8": dict(backend="inductor", fp8=True),
    "actc default": dict(backend="actc", options={}),  # what torch.compile(model, backend="actc") gets
    "actc 8bit": dict(backend="actc", options={"memory_budget": "8bit"}),
    "actc 4bit": dict(backend="actc", options={"memory_budget": "4bit"}),
    "actc 2bit": dict(backend="actc", options={"memory_budget": "2bit"}),
    "actc 0.1": dict(backend="actc", options={"memory_budget": 0.1}),
    # actc's recompute option: Inductor's recompute budget with random draws saved (dropout masks replay)
    "actc 2bit + recompute 0.3": dict(backend="actc", options={"memory_budget": "2bit", "recompute": 0.3}),
    # the default at other recompute budgets than its 0.3
    "actc recompute 0.5": dict(backend="actc", options={"recompute": 0.5}),
    "actc recompute 0.1": dict(backend="actc", options={"recompute": 0.1}),
    # the default with the recompute credit (the default until 2026-12): what Inductor recomputes buys bits
    "actc default + credit": dict(backend="actc", options={"recompute": None, "recompute_credit": True}),
    # one width for every compressed tensor (the allocator has a single choice, so nothing to re-plan)
    "actc 8bit only": dict(backend="actc", options={"memory_budget": "8bit", "bits": [8], "allocation": "static"}),
    "actc 4bit only": dict(backend="actc", options={"memory_budget": "4bit", "bits": [4], "allocation": "static"}),
    "actc 2bit only": dict(backend="actc", options={"memory_budget": "2bit", "bits": [2], "allocation": "static"}),
    "actc 1bit only": dict(backend="actc", options={"memory_budget": "1bit", "bits": [1], "allocation": "static"}),
    # actc's default allocation is "static" (never re-plans); "adaptive" re-plans from measured sensitivities
    "actc 2bit static": dict(backend="actc", options={"memory_budget": "2bit", "allocation": "static"}),
    "actc 2bit adaptive": dict(backend="actc", options={"memory_budget": "2bit", "allocation": "adaptive"}),
    "actc 2bit static + recompute 0.3": dict(backend="actc", options={"memory_budget": "2bit", "allocation": "static",
                                                                      "recompute": 0.3}),
    "actc 2bit adaptive once": dict(backend="actc", options={"memory_budget": "2bit", "allocation": "adaptive",
                                                             "replan_every": 0}),  # one re-plan, then fixed
    # measures every step like adaptive, never re-plans: static's plan plus the statistics (what measuring costs)
    "actc 2bit static + measuring": dict(backend="actc", options={"memory_budget": "2bit", "allocation": "adaptive",
                                                                  "warmup_steps": NEVER}),
    # the adaptive weights: "relative" (the default: per-layer variance over |grad|²) or "absolute" (summed)
    "actc 2bit absolute": dict(backend="actc", options={"memory_budget": "2bit", "allocation": "adaptive",
                                                        "sensitivity": "absolute"}),
    "actc 2bit absolute once": dict(backend="actc", options={"memory_budget": "2bit", "allocation": "adaptive",
                                                             "sensitivity": "absolute", "replan_every": 0}),
    "actc 1.5bit absolute once": dict(backend="actc", options={"memory_budget": "1.5bit", "allocation": "adaptive",
                                                               "sensitivity": "absolute", "replan_every": 0}),
    "actc 1.5bit": dict(backend="actc", options={"memory_budget": "1.5bit"}),
    "actc 1.5bit adaptive": dict(backend="actc", options={"memory_budget": "1.5bit", "allocation": "adaptive"}),
    "actc 1.5bit static": dict(backend="actc", options={"memory_budget": "1.5bit", "allocation": "static"}),
    "actc 1.5bit adaptive once": dict(backend="actc", options={"memory_budget": "1.5bit", "allocation": "adaptive",
                                                               "replan_every": 0}),
}

# Every actc row but "actc default" names its recompute budget, 1.0 (none) unless the row says otherwise, so
# that a row keeps its meaning whatever actc's default is.
for _name, _mode in MODES.items():
    if _mode["backend"] == "actc" and _name != "actc default":
        _mode["options"].setdefault("recompute", 1.0)

# PyTorch's fp8 pass (torch/_functorch/partitioners.py, enable_activation_quantization). It casts saved
# tensors of the allowed dtypes to fp8 with a per-tensor scale. The size threshold is actc's min_bytes
# (16 KiB) so that both leave the same small tensors alone; the stock default (100 MB) skips most tensors.
FP8_PASS = {"quant_type": "torch.float8_e5m2", "use_scaling": True, "allowed_dtypes": "torch.bfloat16",
            "size_in_mb": 16384 / 2**20, "exclude_primals": True}


def select_names(table: dict[str, Any], names: str | Iterable[str]) -> dict[str, Any]:
    """``"a,b"`` (or a list) -> {name: table[name]} in that order; an unknown name fails listing the known ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown name(s) {unknown}; known: {', '.join(table)}")
    return {n: table[n] for n in names}


def select_modes(names: str | Iterable[str]) -> dict[str, dict[str, Any]]:
    """``"inductor,actc 2bit"`` (or a list) -> {name: mode} from MODES."""
    return select_names(MODES, names)


def fp8_skip_reason(device: torch.device, autocast_dtype: torch.dtype | None) -> str | None:
    """Why PyTorch's fp8 activation pass is not run for this model, or None when it is."""
    if device.type != "cuda":
        return "fp8 activation pass: GPU only (it casts bf16 activations; CPU runs are fp32)"
    if autocast_dtype != torch.bfloat16:
        return "fp8 activation pass: bf16 only, and this model trains in fp32"
    return None


@contextlib.contextmanager
def mode_config(mode: dict[str, Any]):
    """The torch config a mode compiles under: recompute budget, fp8 pass. Keep it open while training."""
    with contextlib.ExitStack() as stack:
        if mode.get("recompute") is not None:
            stack.enter_context(torch._functorch.config.patch(activation_memory_budget=mode["recompute"]))
        if mode.get("fp8"):
            opts = dict(torch._inductor.config.post_grad_fusion_options)
            opts["activation_quantization_aten_pass"] = dict(FP8_PASS)
            stack.enter_context(torch._inductor.config.patch(post_grad_fusion_options=opts))
        yield


def replan_after(mode: dict[str, Any]) -> int:
    """Backward passes after which actc re-plans under ``mode`` (its adaptive allocation's warmup_steps), or 0
    when it never does (not actc, or a static allocation). The re-plan recompiles the graphs it changes."""
    if mode["backend"] != "actc":
        return 0
    from actc.config import ActcConfig

    config = ActcConfig.from_options(mode.get("options"))
    return config.warmup_steps if config.allocation == "adaptive" and config.warmup_steps < NEVER else 0


def compile_for(model: nn.Module, mode: dict[str, Any]) -> Callable:
    """``model`` itself for eager, else ``torch.compile`` with the mode's backend and options.
    Resets dynamo first, so no frame compiled for an earlier mode is reused."""
    torch._dynamo.reset()
    if mode["backend"] is None:
        return model
    # a fresh dict per compile: actc keeps one session (and budget) per options object
    kwargs = {"options": dict(mode["options"])} if mode.get("options") is not None else {}
    return torch.compile(model, backend=mode["backend"], **kwargs)


@contextlib.contextmanager
def actc_warnings():
    """Yields a list that collects what the "actc" logger warns meanwhile (a graph or tensor left uncompressed
    after an internal error, a budget that does not fit), so a table row can say so next to its figures."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("actc")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def actc_replans():
    """Yields a function that returns the re-plan records (actc/session.py) of the actc sessions created
    meanwhile: one dict per re-plan, with whether it was taken, its solve time and the recompile time it caused."""
    from actc import session

    before = set(session.SESSIONS)
    yield lambda: [r for k, s in list(session.SESSIONS.items()) if k not in before for r in s.replans]


def disable_inductor_caches() -> None:
    """Every compile runs the partitioner and compiles cold: no FX-graph, AOT or kernel cache hit can
    serve one mode with another's graph or make one mode's compile time look warm. Call before compiling."""
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    torch._inductor.config.force_disable_caches = os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] == "1"


def device_tag(device: torch.device) -> str:
    """``cpu``, or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``): one results folder per device kind."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def machine() -> str:
    """One line about the machine, for the printed header."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads > 1 else ''}{gpu}; torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------ models
class LossOf(nn.Module):
    """Wraps a model so that forward(*inputs, target) returns the scalar loss. The loss is then part of the
    compiled graph (what it saves is measured too) instead of an eager tail outside it."""

    def __init__(self, model: nn.Module, kind: str, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.model, self.kind, self.autocast = model, kind, autocast

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self.kind == "hf":  # transformers: the model computes its own (shifted / masked) LM loss
                return self.model(input_ids=x, labels=y).loss.float()
            out = self.model(x).float()
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class SmallCNN(nn.Sequential):
    """conv -> BN -> ReLU -> max-pool, twice, then dropout and a linear head. On Fashion-MNIST (convergence.py,
    two epochs) it reached 89% test accuracy where actc.models.ConvNet(channels=8), whose global average pool
    leaves the head 16 features, reached 80% at about the same cost."""

    def __init__(self, channels: int = 16, classes: int = 10, in_channels: int = 1, size: int = 28,
                 dropout: float = 0.1) -> None:
        c = channels
        super().__init__(nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * c * (size // 4) ** 2, classes))


# ------------------------------------------------------------------------------------------------ output
def write_csv(rows: list[dict], path: Path, fields: Iterable[str]) -> None:
    fields = list(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in fields})


def merge_csv(path: Path, rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The rows of an earlier run kept in ``path`` (those whose ``key`` no new row has), then ``rows``.

    So one model or mode can be (re)measured alone and the file still holds the rest: a full set need not fit
    in one run. Numbers read back become floats; the caller rewrites the file with what this returns."""
    if not path.is_file():
        return rows
    new = {tuple(str(r.get(k, "")) for k in key) for r in rows}
    with open(path, newline="") as f:
        old = [r for r in csv.DictReader(f) if tuple(r.get(k, "") for k in key) not in new]
    for r in old:
        for k, v in r.items():
            if v == "":
                r[k] = None
                continue
            with contextlib.suppress(TypeError, ValueError):
                r[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    if old:
        print(f"kept {len(old)} row(s) of an earlier run from {path}")
    return old + rows


def baseline(rows: list[dict], row: dict, needs: str | None = None) -> dict | None:
    """The row of ``row``'s model in mode "inductor" (with ``needs`` measured, when given), which every
    bench's ratios are over; None when that row is missing."""
    return next((b for b in rows if b["model"] == row["model"] and b["mode"] == "inductor"
                 and (needs is None or b.get(needs) is not None)), None)


def sort_rows(rows: list[dict], models: Iterable[str], modes: Iterable[str]) -> None:
    """Sort a bench's rows in place by model, then mode, in the order given; names not given go last."""
    models, modes = list(models), list(modes)
    rows.sort(key=lambda r: (models.index(r["model"]) if r["model"] in models else len(models),
                             modes.index(r["mode"]) if r["mode"] in modes else len(modes)))


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (a printed note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None


def grouped_bars(rows: list[dict], panels: list[tuple[str, str]], path: Path, title: str,
                 reference: float | None = None) -> bool:
    """One panel per (key, label): a horizontal bar per (model, mode), models down the side, one colour per
    mode; ``reference`` draws a vertical line (1.0 for ratios). False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(models) * len(modes) + 2))
    height = 0.8 / len(modes)
    for ax, (key, label) in zip(axes, panels):
        for i, mode in enumerate(modes):
            values = [next((r.get(key) or 0.0 for r in rows if r["model"] == m and r["mode"] == mode), 0.0)
                      for m in models]
            ax.barh([j + i * height for j in range(len(models))], values, height, label=mode)
        if reference is not None:
            ax.axvline(reference, color="k", lw=0.8)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(models))], models, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (header, key, format spec); a missing or None value prints as '-'."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) not in (None, "") else "-" for _, k, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
