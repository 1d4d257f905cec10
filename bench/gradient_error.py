"""Gradient error of compressed activations: bias and variance of actc's gradient, per bit-width and per layer.

One fixed batch, fixed weights. The exact gradient is eager fp32 (no compression). For each mode the model is
compiled once and its gradient drawn ``--draws`` times (torch.manual_seed(i) before draw i, so the stochastic
rounding differs between draws and is reproducible). Per layer (parameters grouped by module) and for the
whole model, with g the exact gradient, m the mean of the draws and v the per-element variance of the draws:

  rel bias   |m - g| / |g|: the error left after averaging. Even an unbiased estimator keeps
  floor      sqrt(sum(v) / draws) / |g|, what rel bias is expected to be for an unbiased estimator; so
  excess     sqrt(max(0, bias^2 - floor^2)): the part of the bias that noise does not explain
  rel var    sum(v) / |g|^2: one draw's squared error relative to the gradient (variance per bit-width/layer)
  layer mean the whole model's rows only: the mean over layers of their rel var. The whole-model rel var is
             what SGD's step sees (actc's sensitivity="absolute" weights minimise it); Adam-family optimizers
             scale each parameter's step by its own gradient's RMS, so each layer's relative variance counts
             on its own, and the layer mean is what sensitivity="relative" (the default) minimises.

"inductor" (no compression) shows what compiling alone changes against eager. The other default modes give
every compressed tensor one width ("actc Nbit only"), or let the allocator mix widths at 2 bits on average:
"static" (every element weighs the same), "adaptive once" (bits re-planned once from measured sensitivities;
the warmup_steps backward passes before that re-plan run first and are not counted; actc's default adaptive
allocation also re-plans every 100 passes, which would mix plans inside the draws) and "static + recompute
0.3" (with Inductor's recompute budget). Models: TinyGPT (GELU and attention, whose backwards are not linear in
the saved inputs) and ConvNet (conv/BN/ReLU/max-pool), both without dropout, at initialisation; and
"enwiki", bench/convergence.py's LM after 300 AdamW steps on the Wikipedia slice (loaders.data_dir's
folder, ../shared/data); and, only when named, "mamba" (a tiny random-init transformers Mamba, issue 16's
lead). Inductor's caches are disabled
(TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, unless already set) so actc's partitioner always runs.

    python bench/gradient_error.py [--models tinygpt,convnet,enwiki,mamba] [--modes "actc 2bit only,actc 2bit static"]
                                   [--draws 256] [--threads 1] [--out results]

Prints the tables and writes <out>/<device-tag>/gradient_error.csv and gradient_error.png.
tests/test_gradient_error.py checks the bias bound on a small ReLU network with ``measure``.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import common
import loaders
from actc.models import ConvNet, TinyGPT, copy_task

DEFAULT_MODES = ["inductor", "actc 8bit only", "actc 4bit only", "actc 2bit only", "actc 1bit only", "actc 2bit static",
                 "actc 2bit adaptive once", "actc 1.5bit static", "actc 1.5bit adaptive once",
                 "actc 2bit static + recompute 0.3"]
WHOLE = "(all)"
FIELDS = ("device", "model", "mode", "layer", "numel", "draws", "rel_bias", "floor", "excess", "rel_var",
          "layer_mean")


def tinygpt_case():
    torch.manual_seed(0)
    model = TinyGPT(vocab=128, width=128, layers=2, heads=4, context=64)
    return model, copy_task(16, 64, 128, torch.Generator().manual_seed(1))


def convnet_case():
    torch.manual_seed(0)
    model = ConvNet(channels=16, classes=10, in_channels=1, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))


def enwiki_case(steps: int = 300):
    """bench/convergence.py's enwiki LM after ``steps`` eager AdamW steps on its data, and the next batch:
    the model whose convergence the adaptive rows are judged on, mid-training (gradients no longer those of
    a fresh initialisation). Needs the data folder (loaders.data_dir)."""
    import convergence  # bench/: the task's model, optimizer and batches

    spec = convergence.TASKS["enwiki"]
    torch.manual_seed(0)
    model = spec["build"]()
    opt = spec["opt"](model.parameters())
    train, _ = loaders.enwiki(loaders.data_dir(None))
    batches = convergence.lm_batches(train, spec["batch"], 128, steps + 1, steps + 1)  # context 128
    loss = common.LossOf(model, "logits")
    for _, (x, y, _) in zip(range(steps), batches):
        loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    x, y, _ = next(batches)
    return model, (x, y)


class _Logits(torch.nn.Module):
    """A transformers LM as a module whose forward returns its logits (measure's loss reads a tensor)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def mamba_case():
    """A tiny random-init transformers Mamba (issue 16's lead: one 2-bit draw's gradient cosine was 0.70 on
    torch 2.14). On CPU transformers runs its selective scan as a Python loop over the sequence, so the
    sequence is short: the compiled graph unrolls it."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=128, hidden_size=64, state_size=16, num_hidden_layers=2,
                                      expand=2, conv_kernel=4, use_cache=False)
    return _Logits(transformers.MambaForCausalLM(config)), copy_task(8, 32, 128, torch.Generator().manual_seed(1))


MODELS = {"tinygpt": tinygpt_case, "convnet": convnet_case, "enwiki": enwiki_case, "mamba": mamba_case}


@dataclass
class Stats:
    numel: int
    draws: int
    rel_bias: float
    floor: float
    excess: float
    rel_var: float


def layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().reshape(-1).clone() for n, p in model.named_parameters() if p.grad is not None}


def stats(exact: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor, n: int) -> Stats:
    mean = total / n
    var = (total_sq / n - mean.square()).clamp_min(0) * n / (n - 1)  # per element, unbiased
    norm2 = exact.square().sum().item()
    scale = norm2 if norm2 > 0 else float("nan")
    bias2 = (mean - exact).square().sum().item() / scale
    floor2 = var.sum().item() / n / scale
    return Stats(numel=exact.numel(), draws=n, rel_bias=math.sqrt(bias2), floor=math.sqrt(floor2),
                 excess=math.sqrt(max(0.0, bias2 - floor2)), rel_var=var.sum().item() / scale)


def measure(model: torch.nn.Module, batch: tuple, mode: dict, draws: int = 256,
            layer: Callable[[str], str] = layer_of) -> dict[str, Stats]:
    """Stats of ``mode``'s gradient over ``draws`` seeded draws against eager fp32, per layer and ``WHOLE``.

    ``batch`` is (inputs..., target); the loss is the cross-entropy of the model's output (common.LossOf)."""
    model.train()
    wrapped = common.LossOf(model, "logits")
    model.zero_grad(set_to_none=True)
    wrapped(*batch).backward()
    exact = grads(model)
    total = {n: torch.zeros_like(g) for n, g in exact.items()}
    total_sq = {n: torch.zeros_like(g) for n, g in exact.items()}
    with common.mode_config(mode), common.actc_warnings() as warned:
        fn = common.compile_for(wrapped, mode)
        for i in range(common.replan_after(mode) + 1 if common.replan_after(mode) else 0):
            model.zero_grad(set_to_none=True)  # an adaptive plan settles first (warm-up draws, not counted)
            torch.manual_seed(10**6 + i)
            fn(*batch).backward()
        for i in range(draws):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(i)
            fn(*batch).backward()
            for n, g in grads(model).items():
                total[n] += g
                total_sq[n] += g.square()
    torch._dynamo.reset()
    for w in warned:
        print(f"  actc warned: {w}")
    groups: dict[str, list[str]] = {WHOLE: list(exact)}
    for n in exact:
        groups.setdefault(layer(n), []).append(n)
    cat = lambda d, names: torch.cat([d[n] for n in names])  # noqa: E731
    return {k: stats(cat(exact, names), cat(total, names), cat(total_sq, names), draws) for k, names in groups.items()}


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Per model: relative variance per layer and mode (log), and whole-model bias against its noise floor."""
    plt = common.pyplot()
    if plt is None:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    known = list(common.MODES)
    modes = sorted(dict.fromkeys(r["mode"] for r in rows), key=lambda m: known.index(m) if m in known else len(known))
    color = {m: f"C{i}" for i, m in enumerate(modes)}  # one color per mode in every panel
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 4.2 * len(models)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for (ax_var, ax_bias), model in zip(axes, models):
        rs = [r for r in rows if r["model"] == model]
        present = [m for m in modes if any(r["mode"] == m for r in rs)]
        layers = [lay for lay in dict.fromkeys(r["layer"] for r in rs) if lay != WHOLE]
        width = 0.8 / len(present)
        for j, mode in enumerate(present):
            by = {r["layer"]: r for r in rs if r["mode"] == mode}
            ax_var.bar([i + j * width for i in range(len(layers))],
                       [max(by[lay]["rel_var"], 1e-12) if lay in by else 1e-12 for lay in layers], width,
                       color=color[mode], label=mode)
            whole = by.get(WHOLE)
            if whole:  # zeros (no variance: inductor) drawn at 1e-12, the axes' floor
                ax_bias.bar(j - 0.2, max(whole["rel_bias"], 1e-12), 0.4, color=color[mode])
                ax_bias.bar(j + 0.2, max(whole["floor"], 1e-12), 0.4, color=color[mode], alpha=0.35)
        ax_var.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers, rotation=60, ha="right",
                          fontsize=7)
        ax_var.set_yscale("log")
        ax_var.set_title(f"{model}: relative gradient variance per layer (one draw)", fontsize=9)
        ax_bias.set_xticks(range(len(present)), present, rotation=60, ha="right", fontsize=7)
        ax_bias.set_yscale("log")
        ax_bias.set_title(f"{model}: rel bias (solid) vs noise floor (pale)", fontsize=9)
        for ax in (ax_var, ax_bias):
            ax.grid(True, axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[m]) for m in modes]
    fig.legend(handles, modes, loc="lower center", ncol=min(len(modes), 5), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tinygpt,convnet,enwiki", help=f"comma-separated from {list(MODELS)}")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated names from common.MODES")
    p.add_argument("--draws", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(common.REPO / "results"), help="files go to OUT/<device-tag>/")
    args = p.parse_args(argv)
    common.disable_inductor_caches()
    torch.set_num_threads(args.threads)
    modes = common.select_modes(args.modes)
    tag = common.device_tag(torch.device("cpu"))
    print(f"gradient_error on {common.machine()}; {args.draws} draws a mode")
    rows = []
    for model_name, case in common.select_names(MODELS, args.models).items():
        for mode_name, mode in modes.items():
            print(f"{model_name} / {mode_name} ...", flush=True)
            model, batch = case()
            for layer, s in measure(model, batch, mode, args.draws).items():
                rows.append(dict(device=tag, model=model_name, mode=mode_name, layer=layer, **asdict(s)))
    out = Path(args.out) / tag
    rows = common.merge_csv(out / "gradient_error.csv", rows, ("model", "mode", "layer"))
    order = [*MODELS], [*common.MODES]  # stable: each (model, mode)'s layers keep their order
    rows.sort(key=lambda r: tuple(o.index(r[k]) if r[k] in o else len(o) for o, k in zip(order, ("model", "mode"))))
    per_layer: dict[tuple, list[float]] = {}
    for r in rows:
        if r["layer"] != WHOLE:
            per_layer.setdefault((r["model"], r["mode"]), []).append(r["rel_var"])
    for r in rows:
        if r["layer"] == WHOLE:
            own = per_layer.get((r["model"], r["mode"]))
            r["layer_mean"] = sum(own) / len(own) if own else None
    print("\nwhole model (relative to |exact gradient|):")
    whole = [dict(r, ratio=r["rel_bias"] / r["floor"] if r["floor"] else None) for r in rows if r["layer"] == WHOLE]
    common.print_table(whole, [("model", "model", ""), ("mode", "mode", ""), ("draws", "draws", "d"),
                               ("rel bias", "rel_bias", ".3e"), ("floor", "floor", ".3e"),
                               ("bias/floor", "ratio", ".2f"), ("excess", "excess", ".3e"),
                               ("rel var", "rel_var", ".3e"), ("layer mean", "layer_mean", ".3e")])
    for model_name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model_name and r["layer"] != WHOLE]
        names = list(dict.fromkeys(r["mode"] for r in rs))
        table = {}
        for r in rs:
            table.setdefault(r["layer"], dict(layer=r["layer"], numel=r["numel"]))[r["mode"]] = r["rel_var"]
        print(f"\n{model_name}: relative gradient variance per layer (sum of element variances / |exact|^2)")
        common.print_table(list(table.values()), [("layer", "layer", ""), ("numel", "numel", "d")]
                           + [(m.replace("actc ", ""), m, ".2e") for m in names])
    common.write_csv(rows, out / "gradient_error.csv", FIELDS)
    plotted = plot(rows, out / "gradient_error.png", f"gradient error of compressed activations; {common.machine()}")
    print(f"\nwrote {out / 'gradient_error.csv'}" + (f" and {out / 'gradient_error.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
