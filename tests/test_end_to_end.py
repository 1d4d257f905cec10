"""actc against inductor, end to end: two SGD steps on four models, compared output for output.

Each model is trained three times from the same init and the same ``torch.manual_seed``: under
``backend="inductor"``, and under ``backend="actc"`` at memory_budget "8bit" and "2bit". The runs are
module-scoped fixtures, so every model is compiled three times in all, whatever the number of checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from actc.models import ConvNet, TinyGPT, copy_task, lm_loss
from conftest import assert_unbiased, cosine, measure_saved, train_steps

pytestmark = pytest.mark.slow  # three models trained under several modes: ~20 minutes on 2 cores

# min_bytes (the payoff threshold) is 16 KiB by default: at these toy sizes most activations are smaller,
# and nothing would be compressed. 1 KiB makes every activation of every model here a candidate.
SMALL = 1024


# ------------------------------------------------------------------------------------------------- models
def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 8))


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet(channels=8, classes=10, in_channels=1, dropout=0.1)


TINY = dict(vocab=128, width=64, layers=2, heads=2, context=32)


def make_tinygpt() -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT(**TINY, dropout=0.1)


def gpt2_config(n_embd: int = 64, n_positions: int = 64):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=128, n_positions=n_positions, n_embd=n_embd, n_layer=2, n_head=2, use_cache=False,
                      # dropout left at GPT2's default 0.1 on purpose: the first forwards must still match
                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def make_gpt2(n_embd: int = 64, n_positions: int = 64) -> nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = gpt2_config(n_embd, n_positions)
    config._attn_implementation = "sdpa"  # compiles on CPU with Inductor; "eager" works too but is slower
    return GPT2LMHeadModel(config)


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def ce(out, batch):
    return F.cross_entropy(out, batch[-1])


def lm(out, batch):
    return lm_loss(logits_of(out), batch[-1])


def _data(name: str):
    g = torch.Generator().manual_seed(123)
    if name == "mlp":
        # batch 64: the 2-bit rounding noise of independent samples averages out in the weight gradients
        return [(torch.randn(64, 32, generator=g), torch.randint(0, 8, (64,), generator=g))]
    if name == "cnn":
        return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))]
    if name == "tinygpt":
        return [copy_task(4, TINY["context"], TINY["vocab"], g)]
    if name == "gpt2":
        return [copy_task(4, 32, 128, g)]
    raise KeyError(name)


MODELS = {
    # name: (model_fn, loss_fn, SGD lr: large enough that inductor's loss clearly falls in one step)
    "mlp": (make_mlp, ce, 0.5),
    "cnn": (make_cnn, ce, 0.2),
    "tinygpt": (make_tinygpt, lm, 0.5),
    "gpt2": (make_gpt2, lm, 0.5),
}
BACKENDS = {
    "inductor": ("inductor", None),
    "8bit": ("actc", {"memory_budget": "8bit", "min_bytes": SMALL}),
    "2bit": ("actc", {"memory_budget": "2bit", "min_bytes": SMALL}),
}


DRAWS = 8  # seeded passes per model, inductor and 2bit, for the unbiasedness check


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request):
    """The three training runs of one model: {"inductor": Run, "8bit": Run, "2bit": Run}."""
    name = request.param
    model_fn, loss_fn, lr = MODELS[name]
    batches = _data(name)  # one batch, used by both steps: the loss after step 1 must fall on it
    out = {key: train_steps(model_fn, backend, options, batches, loss_fn, steps=2, seed=0, lr=lr,
                            draws=DRAWS if key in ("inductor", "2bit") else 0)
           for key, (backend, options) in BACKENDS.items()}
    for key, run in out.items():
        print(f"\n[{name}] {key}: losses {run.losses}, cos(grad, inductor) "
              f"{cosine(run.first_grads, out['inductor'].first_grads):.5f}")
    torch._dynamo.reset()
    return name, out


# ------------------------------------------------------------------------------------------------- checks
def test_first_forward_identical(runs):
    """Compression only changes what the backward reads: the forward output is bitwise inductor's.

    Every model here has dropout (p=0.1) active. The forwards still match bit for bit, so actc's stochastic
    rounding does not shift the RNG stream the dropout masks are drawn from (both use Inductor's seeded RNG
    from torch's generator, set with the same torch.manual_seed)."""
    name, r = runs
    ref = r["inductor"].first_output
    for key in ("8bit", "2bit"):
        assert torch.equal(r[key].first_output, ref), f"{name} {key}: first forward differs from inductor"
    # the reference losses must match too (same forward, same loss)
    assert r["8bit"].losses[0] == r["inductor"].losses[0] == r["2bit"].losses[0]


def test_grads_close_at_8bit(runs):
    name, r = runs
    g = r["8bit"].first_grads
    assert torch.isfinite(g).all()
    # 8-bit stochastic rounding: 255 levels per group of 128 gives a relative error per element of about
    # 1/255/sqrt(3) ~ 0.2% of the group's range, averaged over the batch in every weight gradient, so the
    # flattened gradient keeps a cosine of at least 0.999 with the exact one.
    assert cosine(g, r["inductor"].first_grads) >= 0.999


def test_loss_falls_at_2bit(runs):
    name, r = runs
    ind, act = r["inductor"], r["2bit"]
    # lr is chosen per model so that inductor's loss falls clearly (by >= 1%) after one step on the batch
    assert ind.losses[1] < 0.99 * ind.losses[0], ind.losses
    assert act.losses[1] < act.losses[0], act.losses
    assert torch.isfinite(act.first_grads).all()


def test_grads_direction_at_2bit(runs):
    name, r = runs
    # 2 bits leave 3 levels per group: each saved element carries a rounding error up to a third of its
    # group's range, so one step's gradient is noisy (unbiased: see the next test). On these tiny batches
    # (64 rows, 8 images, 128 tokens) the measured cosine is 0.83-0.87 for the MLP and TinyGPT, higher for
    # the others; 0.8 fails a gradient whose direction is broken.
    assert cosine(r["2bit"].first_grads, r["inductor"].first_grads) > 0.8


def test_2bit_noise_averages_out(runs):
    """Stochastic rounding is unbiased, so the error of the mean over K draws shrinks like 1/sqrt(K).

    With d_i = g_actc(seed i) - g_inductor(seed i) (same dropout masks), an unbiased estimator gives
    E|mean d|^2 = E|d|^2 / K; a bias b adds |b|^2 that no averaging removes. The check allows 1.5x the
    unbiased value: the norms are sums over thousands of coordinates, so their spread is a few percent,
    and GELU's backward (a nonlinear function of the dequantized input) leaves a small known bias."""
    name, r = runs
    assert_unbiased([a - b for a, b in zip(r["2bit"].draws, r["inductor"].draws)], name)


# ------------------------------------------------------------------------------------------------- the bias
def test_relu_mask_is_unbiased():
    """Stochastic rounding is unbiased, so the mean of actc's gradient over many seeds must approach the
    exact gradient. Linear -> ReLU -> Linear, 2 bits. ReLU's backward mask is recomputed from the saved
    ReLU output; had it been recomputed from the quantized output, small positive values rounded to 0
    would lose their gradient and the pre-ReLU bias gradient would shrink to ~0.7 of the exact one.
    actc moves that comparison into the forward (passes/hoist.py), so the mask is exact."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))
    x = torch.randn(64, 64)

    def bias_grad(fn, seed):
        m.zero_grad()
        torch.manual_seed(seed)
        fn(x).sum().backward()
        return m[0].bias.grad.clone()

    exact = bias_grad(m, 0)
    compiled = torch.compile(m, backend="actc", options={"memory_budget": "2bit", "min_bytes": SMALL})
    n = 64
    mean = sum(bias_grad(compiled, s) for s in range(n)) / n
    ratio = (mean.norm() / exact.norm()).item()
    print(f"\nE[pre-ReLU bias grad] / exact, 2bit, {n} seeds: norm ratio {ratio:.3f}")
    # 64 independent roundings: the mean's relative noise is ~1/8 of one run's (cosine of one run ~0.8), so an
    # unbiased estimator is within a few percent in norm; a 10% window leaves room for that.
    assert 0.9 < ratio < 1.1


# ------------------------------------------------------------------------------------------------- bytes
def _tinygpt_big():
    torch.manual_seed(0)
    return TinyGPT(vocab=128, width=128, layers=2, heads=4, context=64)


def _gpt2_big():
    return make_gpt2(n_embd=128, n_positions=64)


BIG = {
    # fp32 transformer blocks at a size where activations dominate (8 x 64 tokens x width 128):
    # the default min_bytes (16 KiB) then leaves only small tensors (statistics, biases) alone.
    "tinygpt": (_tinygpt_big, lambda: (copy_task(8, 64, 128, torch.Generator().manual_seed(5))[0],)),
    "gpt2": (_gpt2_big, lambda: (copy_task(8, 64, 128, torch.Generator().manual_seed(5))[0],)),
}


@pytest.mark.parametrize("name", list(BIG))
def test_saved_bytes_2bit_at_least_8x_less(name):
    model_fn, inputs_fn = BIG[name]
    inputs = inputs_fn()
    base = measure_saved(model_fn, "inductor", None, inputs)
    actc_bytes = measure_saved(model_fn, "actc", {"memory_budget": "2bit"}, inputs)
    ratio = base / max(actc_bytes, 1)
    print(f"\n[saved bytes] {name} fp32, batch 8 x 64 tokens, width 128: inductor {base} B, actc 2bit {actc_bytes} B, "
          f"{ratio:.2f}x less")
    # 2 bits of code + 2 bf16 (lo, scale) per 128 elements = 2.25 bits per element vs 32: 14x on what is
    # compressed. What stays exact (attention logsumexp, LayerNorm mean/rstd, int token ids, tensors under
    # min_bytes) must keep the whole at >= 8x.
    assert ratio >= 8.0
