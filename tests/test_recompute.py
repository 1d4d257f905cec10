"""Recompute and random draws: Inductor's recompute budget under actc (the ``recompute`` option), the random
ops it must never recompute, and actc's own seed draw, which must come after the graph's.

Every gradient here is compared with ``backend="inductor"`` at recompute budget 1.0 on the same seed, so the
dropout masks are the same draws; at 8 bits the only difference left is rounding noise (relative error about
3e-3 per element, far inside a cosine of 0.999).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.checkpoint import CheckpointPolicy

import actc
from actc import _torch_compat as compat
from actc.backend import session_for
from actc.config import RECOMPUTE_DEFAULT, RECOMPUTE_LEAST, RECOMPUTE_ON, ActcConfig, ActcOptionError
from actc.passes.partition import ActcPartitioner
from actc.session import Session


def _dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 10))


def _step(backend: str, options: dict | None):
    """One seeded forward and backward: (output, flat parameter gradient)."""
    torch._dynamo.reset()
    model = _dropout_mlp()
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    compiled = torch.compile(model, backend=backend, options=options)
    torch.manual_seed(0)
    out = compiled(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def inductor_step():
    return _step("inductor", None)


@pytest.mark.parametrize("value, expected", [(None, None), (True, RECOMPUTE_ON), (False, 1.0), (0.5, 0.5), (1, 1.0)])
def test_recompute_option_values(value, expected):
    assert ActcConfig.from_options({"recompute": value}, env={}).recompute == expected


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.3, "0.3", [0.3]])
def test_bad_recompute_value_names_the_option(value):
    with pytest.raises(ActcOptionError, match=r"option 'recompute': invalid value .*0 < f <= 1"):
        ActcConfig.from_options({"recompute": value}, env={})


def test_recompute_budget_resolution():
    """The option wins; without it torch's own activation_memory_budget applies when a user set it."""
    assert ActcConfig(recompute=0.5).recompute_budget(0.2) == 0.5
    assert ActcConfig().recompute_budget(0.2) == 0.2
    assert ActcConfig().recompute_budget(1.0) == RECOMPUTE_DEFAULT == 0.3
    assert ActcConfig(recompute=1.0).recompute_budget(1.0) == 1.0
    assert ActcConfig().recompute_budget(0.0) == RECOMPUTE_LEAST > 0  # 0 would redraw dropout
    assert ActcConfig().recompute_budget(0.001) == 0.001  # any other setting of the user's is kept
    # only actc's own default may be lowered for a memory budget (recompute_budget.recompute_more)
    assert ActcConfig().recompute_is_default(1.0)
    assert not ActcConfig().recompute_is_default(0.3) and not ActcConfig(recompute=0.3).recompute_is_default(1.0)


def test_keep_saved_tags_only_untagged_random_draws():
    def f(x, y):
        return x * (torch.ops.aten.rand_like.default(x) > 0.5) + torch.ops.aten.rand_like.default(y)

    gm = make_fx(f)(torch.randn(8), torch.randn(8))
    draws = [n for n in gm.graph.nodes if n.target is torch.ops.aten.rand_like.default]
    draws[1].meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE  # a user's checkpoint policy stays
    assert compat.keep_saved(gm) == [draws[0]]
    assert draws[0].meta["recompute"] == CheckpointPolicy.MUST_SAVE
    assert draws[1].meta["recompute"] == CheckpointPolicy.PREFER_RECOMPUTE
    assert all("recompute" not in n.meta for n in gm.graph.nodes if n not in draws)


@pytest.mark.parametrize("dropout_p,tagged", [(0.0, False), (0.1, True)])
def test_attention_without_dropout_may_be_recomputed(dropout_p, tagged):
    """torch tags every attention op nondeterministic_seeded for its optional dropout. At dropout_p = 0 it
    draws nothing, so keep_saved leaves it to the partitioner, which recomputes it under a budget as
    Inductor's own partition does (before, actc saved the attention output and its logsumexp that Inductor
    recomputes, a quantize kernel more per layer on the Triton path). With dropout it stays MUST_SAVE."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert torch.Tag.nondeterministic_seeded in op.tags

    def f(q, k, v):
        return op(q, k, v, dropout_p)[0]

    q = torch.randn(1, 2, 8, 4)
    gm = make_fx(f, tracing_mode="fake")(q, q.clone(), q.clone())  # the CPU kernel itself refuses dropout
    (attention,) = [n for n in gm.graph.nodes if n.target is op]
    assert compat.keep_saved(gm) == ([attention] if tagged else [])


def test_actc_seeds_draw_after_the_graph_seeds(inductor_step):
    """At a budget that keeps one tensor exact and quantizes another, Inductor's scheduler emitted actc's seed
    draw before dropout's, so every dropout mask changed (gradient cosine 0.91). The seed call now takes the
    graph's seeds as an argument: the forward is bit-identical to Inductor's and the masks are its masks."""
    options = {"memory_budget": 0.5, "min_bytes": 1024, "recompute": 1.0}
    out, grad = _step("actc", options)
    (plan,) = session_for(options).plans
    assert {t.kind for t in plan.tensors} >= {"keep", "quant"}
    assert "torch.ops.actc.seeds.default(1, device(type='cpu'), [inductor_seeds_default])" in plan.forward_code
    ref_out, ref_grad = inductor_step
    assert torch.equal(out, ref_out)
    assert F.cosine_similarity(grad, ref_grad, dim=0) >= 0.999


@pytest.mark.parametrize("recompute", [0.3, 0.05])
def test_dropout_under_a_recompute_budget_keeps_its_mask(inductor_step, recompute):
    """Inductor alone at budget 0.3 recomputes dropout with a new mask on CPU (bench/probe_recompute_dropout.py,
    cosine 0.90); under actc the draw is MUST_SAVE, so its seed is saved and the mask replays."""
    options = {"memory_budget": "8bit", "min_bytes": 1024, "recompute": recompute}
    out, grad = _step("actc", options)
    ref_out, ref_grad = inductor_step
    assert torch.equal(out, ref_out)
    assert F.cosine_similarity(grad, ref_grad, dim=0) >= 0.999
    (plan,) = session_for(options).plans
    assert "inductor_lookup_seed" in {t.producer for t in plan.tensors}  # the seed is what is saved


def test_a_cheap_pointwise_tensor_is_recomputed_not_quantized():
    """Under a recompute budget the dropout output (pointwise in what is saved anyway) is recomputed by
    Inductor, 0 bytes, where at 1.0 actc stores it at 2 bits; the plan says which and why."""
    rows = {}
    for recompute in (1.0, 0.3):
        torch._dynamo.reset()
        (plan,) = actc.explain(_dropout_mlp(), torch.randn(64, 32), memory_budget="2bit", min_bytes=1024,
                               recompute=recompute).plans
        rows[recompute] = {t.name: t for t in plan.tensors}
    assert (rows[1.0]["mul_1"].kind, rows[1.0]["mul_1"].bits) == ("quant", 2)
    row = rows[0.3]["mul_1"]
    assert (row.kind, row.bytes_after, row.bytes_before) == ("recompute", 0, 64 * 256 * 4)
    assert row.reason == "recomputed in the backward by Inductor's partitioner (recompute budget 0.3)"


def _gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256),
                         nn.GELU(), nn.Linear(256, 8))


def _gelu_step(backend: str, options: dict | None):
    """One seeded step of ``_gelu_mlp``: (flat parameter gradient, actc's plans)."""
    torch._dynamo.reset()
    model = _gelu_mlp()
    compiled = torch.compile(model, backend=backend, options=options)
    compiled(torch.randn(64, 64, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    plans = session_for(options).plans if backend == "actc" else []
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), plans


@pytest.mark.parametrize("chosen_by", [None, "option", "torch"])
def test_a_budget_compression_cannot_meet_is_met_by_recomputing_more(chosen_by, caplog):
    """At Inductor's recompute budget 0.3 this MLP saves one GELU input, which erf's backward holds to >= 4
    bits: 8704 B, where the budget (0.01 of the saved bytes) allows 3932. Under actc's default recompute
    budget the graph is partitioned again at lower budgets, and the first plan that fits is taken (0.15:
    everything recomputed, so the gradient is Inductor's). A recompute budget the user chose (the option, or
    torch's own activation_memory_budget) is kept, and the warning says the memory budget is not met."""
    options = {"memory_budget": 0.01, "min_bytes": 1024, **({"recompute": 0.3} if chosen_by == "option" else {})}
    torch_budget = 0.3 if chosen_by == "torch" else 1.0
    with caplog.at_level(logging.INFO, logger="actc"), \
            torch._functorch.config.patch(activation_memory_budget=torch_budget):
        grad, (plan,) = _gelu_step("actc", options)
    recomputed = {t.reason for t in plan.tensors if t.kind == "recompute"}
    messages = [r.getMessage() for r in caplog.records]
    if chosen_by is None:
        assert plan.feasible and plan.graph == 0 and plan.recompute == 0.15
        assert plan.totals().endswith("budget 0.01 of saved bytes, recompute budget 0.15")
        assert sum(t.bytes_after for t in plan.tensors if t.activation) <= plan.budget_bytes
        assert recomputed == {"recomputed in the backward by Inductor's partitioner (recompute budget 0.15)"}
        assert any("recomputing more (Inductor's recompute budget 0.3 -> 0.15)" in m for m in messages)
        assert not any("cannot be met" in m for m in messages)
        ref, _ = _gelu_step("inductor", None)
        assert F.cosine_similarity(grad, ref, dim=0) >= 0.9999  # nothing is quantized: exact up to the kernels' fp32 summation order
    else:
        assert not plan.feasible and plan.recompute == 0.3
        assert recomputed == {"recomputed in the backward by Inductor's partitioner (recompute budget 0.3)"}
        assert [m for m in messages if "cannot be met" in m and "recompute budget 0.3" in m]


@pytest.mark.parametrize("torch_budget", [1.0, 0.0])
def test_recomputing_more_never_redraws_dropout(torch_budget):
    """No recompute budget meets 0.02 here (the GELU input needs 4 bits), so every budget actc tries is
    partitioned. At a budget of exactly 0, torch 2.13's partitioner saves only the graph's inputs, MUST_SAVE
    tags or not, and redrew the dropout mask in the backward (the forward then matched Inductor's and the
    gradient did not: cosine 0.52); actc's lowest budget is 1/64 of the one in force, which keeps the draw
    saved. A user's torch setting of 0 compiles at RECOMPUTE_LEAST for the same reason."""
    def step(backend, options):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(0.5), nn.Linear(128, 4))
        compiled = torch.compile(model, backend=backend, options=options)
        torch.manual_seed(1)
        out = compiled(torch.randn(16, 32, generator=torch.Generator().manual_seed(2)))
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    with torch._functorch.config.patch(activation_memory_budget=torch_budget):
        out, grad = step("actc", {"memory_budget": 0.02, "min_bytes": 1024})
    ref_out, ref_grad = step("inductor", None)
    assert torch.equal(out, ref_out)
    # one draw, the GELU input at 4 bits: far above a redrawn mask's cosine
    assert F.cosine_similarity(grad, ref_grad, dim=0) >= 0.99


@pytest.mark.slow  # 15-50 s on 2 cores: full suite only
@pytest.mark.parametrize("credit", [True, False])
def test_recomputed_tensors_keep_their_share_of_an_average_bits_budget(credit):
    """recompute_credit=True: '2bit' means every compressible tensor at 2 bits, and what Inductor recomputes
    leaves its share to the tensors that are saved, so their bits can only rise. The default (False) counts
    only what is saved: the saved tensors keep their widths and the recompute lowers memory."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 8))
    x = torch.randn(128, 64)
    plans = {}
    for recompute in (1.0, 0.5):
        options = {"memory_budget": "2bit", "min_bytes": 1024, "recompute": recompute, "recompute_credit": credit}
        compiled = torch.compile(model, backend="actc", options=options)
        compiled(x).square().mean().backward()
        session = session_for(options)
        (region,) = session.regions.values()
        (plans[recompute],) = session.plans
        assert (region.credit > 0) == (credit and recompute < 1.0)
        torch._dynamo.reset()
    rows = {r: {t.name: t for t in plans[r].tensors} for r in plans}
    # at 0.5 Inductor recomputes the first Linear's output and GELU; tanh, saved either way, gets their share
    assert rows[0.5]["addmm"].kind == "recompute" and rows[1.0]["addmm"].kind == "quant"
    assert (rows[1.0]["tanh"].bits, rows[0.5]["tanh"].bits) == ((4, 8) if credit else (4, 4))
    assert plans[0.5].bytes_after < plans[1.0].bytes_after or credit


def test_the_cache_key_follows_the_recompute_budget():
    partitioner = ActcPartitioner(Session(ActcConfig.from_options({}, env={})))
    with compat.recompute_budget(0.3):
        at_03 = partitioner.uuid()
    assert at_03 != partitioner.uuid()


# ------------------------------------------------------------------------------------------------ picks
def _pool_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1))


def test_max_pool_is_saved_not_recomputed():
    """At the default recompute budget Inductor would recompute conv -> BN -> ReLU -> max-pool in the backward,
    from a conv output that actc compresses: the pool would pick other elements than the forward did.
    compat.keep_saved keeps the pool's outputs saved instead: no max-pool in the backward, its int8 offsets
    exact, its values compressed (a conv's weight gradient reads them linearly)."""
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (plan,) = actc.explain(_pool_net(), x, min_bytes=1024).plans
    # the backward only turns the saved offsets into indices (_low_memory_max_pool_offsets_to_indices)
    assert not any(op in plan.backward_code for op in ("max_pool_with_offsets.", "max_pool2d_with_indices."))
    offsets = [t for t in plan.tensors if t.dtype == "int8"]
    assert offsets and all(t.kind == "skip" and "kept exact" in t.reason for t in offsets)
    pooled = [t for t in plan.tensors if t.shape == "(8, 8, 14, 14)" and t.dtype == "float32"]
    assert pooled and all(t.kind == "quant" for t in pooled), [(t.name, t.kind, t.reason) for t in pooled]


def test_a_checkpointed_max_pool_keeps_its_input_exact():
    """Under activation checkpointing the backward recomputes the pool whatever the budget (the user's tags
    win over keep_saved): the tensor it pools stays exact, named in the plan (candidates' class 'select')."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x):
            return checkpoint(self.block, torch.tanh(x), use_reentrant=False)

    torch.manual_seed(0)
    x = torch.randn(8, 8, 16, 16, requires_grad=True)
    (plan,) = actc.explain(Checkpointed(), x, min_bytes=1024).plans
    tanh = next(t for t in plan.tensors if t.name == "tanh")
    assert tanh.kind == "skip" and "(select)" in tanh.reason, tanh.reason


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def test_batch_norm_statistics_are_saved_not_recomputed(monkeypatch):
    """At the default recompute budget Inductor's knapsack recomputes the second BatchNorm's statistics
    (var_mean) in the backward from its conv output. From a compressed output E[x̂²] = x² + Var(e), so that
    output would need 8 bits (class 'stat'). partition._recomputes_statistics sees this and partitions again
    with the forward's statistics saved (one value per channel): the conv output is read linearly, gets
    2 bits, and the plan saves less. With that step patched out the same model shows the 8 bits."""
    from actc.passes import partition

    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    (plan,) = actc.explain(_bn_cnn(), x, min_bytes=1024).plans
    monkeypatch.setattr(partition, "_recomputes_statistics", lambda *args: False)
    (stock,) = actc.explain(_bn_cnn(), x, min_bytes=1024).plans
    conv, conv_stock = (next(t for t in p.tensors if t.name == "convolution_1") for p in (plan, stock))
    assert conv_stock.bits == 8 and "(stat)" in conv_stock.reason
    assert conv.kind == "quant" and conv.bits == 2 and "stat" not in conv.reason
    assert plan.feasible and plan.bytes_after < 0.7 * stock.bytes_after


def test_saved_batch_norm_statistics_keep_the_gradient():
    """The re-partition only moves what is saved; at 8 bits the gradient matches Inductor's (cosine 0.999:
    8-bit rounding noise, relative error about 3e-3 per element)."""
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    grads = []
    for backend, options in (("inductor", None), ("actc", {"memory_budget": "8bit", "min_bytes": 1024})):
        torch._dynamo.reset()
        model = _bn_cnn()
        F.cross_entropy(torch.compile(model, backend=backend, options=options)(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert F.cosine_similarity(grads[0], grads[1], dim=0) >= 0.999
