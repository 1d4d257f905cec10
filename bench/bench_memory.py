"""Saved activation memory of random-init transformers models at realistic sizes: inductor against actc.

Issue 16 asks for the saved-bytes ratio at actc's default budget on the models people train, at sizes where
activations dominate (width >= 256, sequence >= 256), not at the toy sizes of the tests. Each model is
built at width 256 with 4 layers (T5: 2 encoder and 2 decoder layers), batch 2 x 256 tokens, fp32, random
init, and one training forward is run under each mode; nothing is trained and no backward runs, so a mode
costs one compile. Columns:

  saved MiB   bytes the forward keeps for the backward (actc.measure.saved_bytes: unique storages seen by
              saved_tensors_hooks, parameters, buffers and inputs left out)
  x less      inductor's saved MiB over this mode's
  weights MiB with --autocast bf16: saved bf16 copies of the parameters (autocast casts each weight once per
              forward and a matmul's backward keeps the copy). They are not activations, so they are counted
              apart, as the plan counts primals, and "saved MiB" and "x less" leave them out
  compile s   the first forward, compile included (on a shared CPU, a rough figure)

Modes: "inductor"; "actc default" (options={}, what users get: 2 bits on average over what is saved,
Inductor's recompute budget 0.3); "actc 2bit recompute 1.0" (compression alone); "actc default + credit"
(recompute_credit=True, the default until 2026-12: what Inductor recomputes keeps its share of the budget,
which buys bits for the saved tensors). Memory does not depend on machine load.

    python bench/bench_memory.py [--models gpt2,bert,llama,qwen2,t5] [--batch 2] [--seq 256] [--autocast bf16]
                                 [--out results]

Prints a table and writes <out>/<device-tag>/memory.csv and memory.png (memory_bf16.* with --autocast bf16).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import common
import loaders
from actc.measure import saved_storages

WIDTH, LAYERS, HEADS, VOCAB = 256, 4, 8, 1024
MODES = {"inductor": ("inductor", None), "actc default": ("actc", {}),
         "actc 2bit recompute 1.0": ("actc", {"memory_budget": "2bit", "recompute": 1.0}),
         "actc default + credit": ("actc", {"recompute_credit": True})}


def _decoder(cls_name: str, config_name: str, seq: int, **extra):
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=seq, **extra)
    return getattr(transformers, cls_name)(config)


def _t5(seq: int):
    import transformers

    config = transformers.T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=WIDTH // HEADS, d_ff=4 * WIDTH,
                                   num_layers=LAYERS // 2, num_decoder_layers=LAYERS // 2, num_heads=HEADS,
                                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config)


MODELS = {  # name: (build(seq), masked-LM labels)
    "gpt2": (lambda seq: loaders.gpt2(LAYERS, WIDTH, HEADS, seq, VOCAB), False),
    "bert": (lambda seq: loaders.bert(LAYERS, WIDTH, HEADS, seq, VOCAB), True),
    "llama": (lambda seq: _decoder("LlamaForCausalLM", "LlamaConfig", seq), False),
    "qwen2": (lambda seq: _decoder("Qwen2ForCausalLM", "Qwen2Config", seq), False),
    "t5": (_t5, False),
}


def _saved(forward, params: list[torch.Tensor], exclude: tuple) -> tuple[int, int, torch.Tensor]:
    """(activation bytes, bytes of low-precision parameter copies, output) of ``forward()``, the storages
    counted as actc.measure.saved_bytes counts them. A copy is a saved tensor equal to a parameter cast to
    its dtype (or to its transpose, for a matmul's weight)."""
    seen, out = saved_storages(forward, exclude)

    def is_copy(t: torch.Tensor) -> bool:
        if not t.is_floating_point() or t.dtype == torch.float32:
            return False
        for p in params:
            cast = p.detach().to(t.dtype)
            if t.shape == cast.shape and torch.equal(t, cast) or t.dim() == 2 and t.t().shape == cast.shape \
                    and torch.equal(t.t(), cast):
                return True
        return False

    copies = {k for k, t in seen.items() if is_copy(t)}
    return (sum(k[1] for k in seen if k not in copies), sum(k[1] for k in copies), out)


def measure(name: str, mode: str, batch: int, seq: int, autocast: torch.dtype | None = None) -> dict:
    build, masked = MODELS[name]
    backend, options = MODES[mode]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(seq).train()
    model.config.use_cache = False
    x, y = loaders.token_batch(batch, seq, VOCAB, masked)
    kwargs = {"input_ids": x, "labels": y}
    compiled = torch.compile(model, backend=backend, options=dict(options) if options is not None else None)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        nbytes, weights, out = _saved(lambda: compiled(**kwargs).loss, list(model.parameters()),
                                      (*model.parameters(), *model.buffers(), x, y))
    seconds = time.perf_counter() - start
    assert torch.isfinite(out), f"{name} {mode}: loss {out.item()}"
    return dict(model=name, mode=mode, batch=batch, seq=seq, width=WIDTH, layers=LAYERS, saved_mib=nbytes / 2**20,
                weights_mib=weights / 2**20, compile_s=seconds)


def plot(rows: list[dict], path, precision: str = "fp32") -> None:
    plt = common.pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        vals = [next((r["saved_mib"] for r in rows if r["model"] == m and r["mode"] == mode), 0) for m in models]
        ax.bar([i + k * w for i in range(len(models))], vals, w, label=mode)
    ax.set_xticks([i + w * (len(modes) - 1) / 2 for i in range(len(models))], models)
    ax.set_ylabel("saved MiB (one training forward)")
    ax.set_title(f"width {WIDTH}, {LAYERS} layers, batch x seq {rows[0]['batch']} x {rows[0]['seq']}, {precision}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--autocast", choices=["bf16"], default=None, help="run the forward under CPU bf16 autocast")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(common.REPO / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    common.disable_inductor_caches()
    out = common.Path(args.out) / common.device_tag(torch.device("cpu"))
    os.makedirs(out, exist_ok=True)
    fields = ("model", "mode", "batch", "seq", "width", "layers", "saved_mib", "x_less", "weights_mib", "compile_s")
    stem = "memory_bf16" if args.autocast else "memory"
    rows, table = [], []
    for name in common.select_names(MODELS, args.models):
        for mode in common.select_names(MODES, args.modes):
            row = measure(name, mode, args.batch, args.seq, torch.bfloat16 if args.autocast else None)
            base = common.baseline([*rows, row], row)
            row["x_less"] = base["saved_mib"] / row["saved_mib"] if base and row["saved_mib"] else None
            rows.append(row)
            print(f"{name:<6} {mode:<24} {row['saved_mib']:8.2f} MiB  {row['compile_s']:6.1f} s", flush=True)
            table = common.merge_csv(out / f"{stem}.csv", rows, ("model", "mode", "batch", "seq"))
            common.write_csv(table, out / f"{stem}.csv", fields)  # after each row: a long run keeps what it measured
    plot(table, out / f"{stem}.png", "bf16 autocast" if args.autocast else "fp32")
    rows = table
    print()
    common.print_table(rows, [("model", "model", ""), ("mode", "mode", ""), ("saved MiB", "saved_mib", ".2f"),
                              ("x less", "x_less", ".1f"), ("weights MiB", "weights_mib", ".2f"),
                              ("compile s", "compile_s", ".1f")])
    print(f"\nwrote {out / stem}.csv and .png")


if __name__ == "__main__":
    main()
