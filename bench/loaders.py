"""What the benches train: the transformers model builders (random init), random token batches, and the
Fashion-MNIST / enwiki loaders. Not a script; bench_train.py, bench_memory.py, bench_compile.py,
convergence.py and gradient_error.py import it.
"""
from __future__ import annotations

import bz2
import gzip
import struct
from pathlib import Path

import torch
import torch.nn as nn

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------ models
def gpt2(layers: int, width: int, heads: int, context: int, vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=context, vocab_size=vocab,
                        bos_token_id=0, eos_token_id=0, use_cache=False)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def bert(layers: int, width: int, heads: int, context: int, vocab: int) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                        intermediate_size=4 * width, max_position_embeddings=context, vocab_size=vocab)
    config._attn_implementation = "sdpa"
    return BertForMaskedLM(config)


def token_batch(batch: int, context: int, vocab: int, masked: bool, seed: int = 1):
    """Random tokens and labels (all positions for GPT-2's shifted loss; 15% positions for BERT, rest -100)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, context), generator=g)
    if not masked:
        return x, x.clone()
    y = torch.where(torch.rand(batch, context, generator=g) < 0.15, x, torch.full_like(x, -100))
    return x, y


# ------------------------------------------------------------------------------------------------ data
def data_dir(arg: str | None) -> Path:
    """--data, else ../shared/data next to the repo; otherwise fail saying where to get the files."""
    path = Path(arg) if arg else DEFAULT_DATA
    if not path.is_dir():
        raise SystemExit(
            f"data folder {path} not found. Pass --data DIR holding fashion-mnist/*-ubyte.gz (Fashion-MNIST in "
            "IDX gz format: github.com/zalandoresearch/fashion-mnist, or Debian's dataset-fashion-mnist) and "
            "enwiki/enwiki-slice.xml.bz2 (a bz2 English-Wikipedia XML dump slice, e.g. from dumps.wikimedia.org "
            "or the test data of the PyPI wheel gensim==4.4.0).")
    return path


def _need(path: Path) -> Path:
    if not path.is_file():
        raise SystemExit(f"{path} not found; see --help for where to get the data files")
    return path


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzip): big-endian magic (2051 images / 2049 labels), counts, then raw uint8."""
    raw = gzip.open(_need(path), "rb").read()
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(count, rows, cols)
    if magic == 2049:
        return torch.frombuffer(bytearray(raw[8:]), dtype=torch.uint8).view(count)
    raise SystemExit(f"{path}: magic {magic} is not an IDX image (2051) or label (2049) file")


def fashion_mnist(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images float [N, 1, 28, 28], normalised."""
    d = root / "fashion-mnist"
    xs = [read_idx(d / f"{s}-images-idx3-ubyte.gz").float().div(255).unsqueeze(1) for s in ("train", "t10k")]
    ys = [read_idx(d / f"{s}-labels-idx1-ubyte.gz").long() for s in ("train", "t10k")]
    mean, std = xs[0].mean(), xs[0].std()
    return (xs[0] - mean) / std, ys[0], (xs[1] - mean) / std, ys[1]


def enwiki(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, validation bytes) as uint8 tensors; the last 10% is validation."""
    raw = bz2.open(_need(root / "enwiki" / "enwiki-slice.xml.bz2"), "rb").read()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]
