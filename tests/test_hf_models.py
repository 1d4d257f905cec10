"""Tiny random-init transformers models of the families users fine-tune (Llama, Mistral, Qwen2: grouped-query
attention, RMSNorm, rotary embeddings; T5: encoder-decoder with relative position bias), with and without
a padded attention mask, against ``backend="inductor"``.

Their attention masks are built in the forward by ``where`` from the padding, and hold -inf or the dtype's
minimum: quantized, such a group has no finite step and used to dequantize to NaN (52,096 of 106,816 Llama
gradient elements). Now the mask is no activation (passes/candidates.py, ``grad_reach``) and stays exact, and
the quantizer would store it exactly anyway (kernels/quant.py, endpoint groups).
"""
from __future__ import annotations

import pytest
import torch

from actc.backend import session_for
from conftest import cosine, flat_grads

pytestmark = pytest.mark.slow  # four transformers families, minutes on 2 cores

transformers = pytest.importorskip("transformers")

BATCH, SEQ, VOCAB = 4, 32, 128
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER, sliding_window=16)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)),
}


def make(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.config.use_cache = False
    return model.train()


def batch(padded: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    if padded:  # left padding of different lengths, as a tokenizer's batch has
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        for row, pad in enumerate((0, 5, 11, 3)):
            mask[row, :pad] = 0
        inputs["attention_mask"] = mask
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def grads(model: torch.nn.Module, backend: str, options: dict | None, inputs: dict) -> tuple[float, torch.Tensor, list]:
    """One forward and backward: the loss, the flattened grads, and actc's plans (read while the compiled
    model is alive: a session lives as long as the graphs compiled with it)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options)
    torch.manual_seed(2)
    loss = compiled(**inputs).loss
    loss.backward()
    plans = list(session_for(options).plans) if backend == "actc" else []
    return loss.item(), flat_grads(model), plans


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_nan_and_8bit_gradient_matches_inductor(family, padded):
    inputs = batch(padded)
    ref_loss, ref, _ = grads(make(family), "inductor", None, inputs)
    # tiny sizes: compress tensors from 1 KiB. keep_uncompressed=False: at the default recompute budget the
    # tensors Inductor recomputes leave their 8-bit share to the rest, enough to keep T5's saved tensors
    # exact; every candidate is compressed instead, so that the comparison tests compression
    options = {"memory_budget": "8bit", "min_bytes": 1024, "keep_uncompressed": False}
    loss, got, plans = grads(make(family), "actc", options, inputs)
    assert any(t.kind == "quant" for p in plans for t in p.tensors), "nothing was compressed"
    assert torch.isfinite(ref).all()
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} of {got.numel()} grads not finite"
    # the forward is exact under actc (only saved tensors are rounded): the loss matches to fp32 rounding
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    # 8-bit stochastic rounding: each saved element within 1/255 of its group's range, averaged over every
    # weight gradient; cosine 0.999 is the bar (measured 0.99999+ on these models)
    assert cosine(got, ref) >= 0.999
    # no saved float tensor that depends on no grad-requiring input is compressed (the mask, positions)
    for p in plans:
        for t in p.tensors:
            if "not an activation" in t.reason:
                assert t.kind == "skip"
