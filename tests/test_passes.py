"""The passes, checked on the rewritten graphs and their plans: which tensors, which bits, how many bytes."""
import logging
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actc
from actc.session import Session
from actc.config import ActcConfig
from actc.kernels import quant
from actc.models import TinyGPT
from actc.passes.partition import ActcPartitioner


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8))


def explain(model, *inputs, **options):
    """actc.explain with Inductor's recompute budget pinned at 1.0 (``recompute=1.0``): the tests here check
    how actc treats each tensor that Inductor saves, so Inductor must save them all. What the default
    budget recomputes is checked in test_default_plan_recomputes_and_lowers_memory and test_recompute.py."""
    return actc.explain(model, *inputs, **{"recompute": 1.0, **options})


def by_name(explanation):
    (plan,) = explanation.plans
    return {t.name: t for t in plan.tensors}, plan


def test_mlp_plan_bits_and_bytes():
    x = torch.randn(32, 64)
    tensors, plan = by_name(explain(mlp(), x, memory_budget="2bit", min_bytes=1024))
    quantized = {n: t for n, t in tensors.items() if t.kind == "quant"}
    # the GELU input (addmm, 32x256) and the ReLU output are what the backward needs
    assert "addmm" in quantized and quantized["addmm"].shape == "(32, 256)"
    for name, t in quantized.items():
        numel = math.prod(int(s) for s in t.shape.strip("()").split(", "))
        # GELU's backward takes erf of its input: a smooth nonlinear consumer, held to >= 4 bits
        bits = 4 if name == "addmm" else 2
        assert t.bits == bits, (name, t.reason)
        assert t.bytes_before == numel * 4
        assert t.bytes_after == quant.compressed_bytes(numel, bits, 128, torch.float32)
    assert "read by erf" in quantized["addmm"].reason
    # parameters are listed as primals, skipped, and not counted
    primals = [t for t in tensors.values() if t.reason == "primal"]
    assert primals and all(not t.activation and t.kind == "skip" for t in primals)
    assert plan.bytes_before == sum(t.bytes_before for t in tensors.values() if t.activation)
    # the graphs: forward returns codes and meta, backward takes them instead of the saved tensor
    assert "addmm_codes" in plan.forward_code and "addmm_meta" in plan.forward_code
    bw_signature = plan.backward_code.split("def forward(")[1].split(")")[0]
    assert "addmm_codes" in bw_signature and " addmm," not in bw_signature + ","
    # rounding noise: one actc::seeds call (seeded from torch's generator), one seed per quantized tensor,
    # hashed with the element index inside the quantizer (no aten.rand, no Inductor RNG of actc's own)
    assert plan.forward_code.count("torch.ops.actc.seeds.default(") == 1
    assert f"torch.ops.actc.seeds.default({len(quantized)}," in plan.forward_code
    assert "inductor_random" not in plan.forward_code and "aten.rand" not in plan.forward_code


def test_gelu_output_read_only_by_a_matmul_is_recomputed():
    """passes/remat.py: the GELU output (mul_2) is saved for fc2's weight gradient alone; it is recomputed in
    the backward from the dequantized GELU input (addmm, which GELU's backward reads anyway) and not saved.
    The ReLU output, read by a matmul too, is not a function of another saved tensor and stays quantized."""
    tensors, plan = by_name(explain(mlp(), torch.randn(32, 64), memory_budget="2bit", min_bytes=1024))
    gelu = tensors["mul_2"]
    assert (gelu.kind, gelu.bits, gelu.bytes_before, gelu.bytes_after) == ("recompute", None, 32 * 256 * 4, 0)
    assert "from %addmm" in gelu.reason and tensors["relu"].kind == "quant"
    bw_signature = plan.backward_code.split("def forward(")[1].split(")")[0]
    assert "mul_2" not in bw_signature and "addmm_codes" in bw_signature
    assert plan.backward_code.count("aten.erf.default(") == 2  # GELU recomputed, and GELU's own backward
    assert plan.bytes_before == sum(t.bytes_before for t in tensors.values() if t.activation)


def test_default_plan_recomputes_and_lowers_memory():
    """At the default recompute budget (config.RECOMPUTE_DEFAULT, 0.3) Inductor's partitioner itself recomputes
    the GELU output in the backward. The '2bit' budget counts only what is saved (recompute_credit=False), so
    the saved tensors keep the widths that recompute=1.0 gives them and the recompute lowers memory."""
    x = torch.randn(32, 64)
    tensors, plan = by_name(actc.explain(mlp(), x, memory_budget="2bit", min_bytes=1024))
    pinned, _ = by_name(explain(mlp(), x, memory_budget="2bit", min_bytes=1024))
    assert tensors["mul_2"].kind == "recompute" and "recompute budget 0.3" in tensors["mul_2"].reason
    assert tensors["relu"].bits == pinned["relu"].bits == 2
    assert plan.feasible and plan.bytes_after * 10 < plan.bytes_before


def test_the_recompute_credit_buys_bits():
    """recompute_credit=True: the recomputed GELU output keeps its 2-bit share of the budget, which goes to a
    tensor that stays saved: the ReLU output gets 8 bits where the default gives it 2, the plan still meets
    '2bit' counted over every compressible tensor, and it saves more than the default."""
    x = torch.randn(32, 64)
    _, default = by_name(actc.explain(mlp(), x, memory_budget="2bit", min_bytes=1024))
    tensors, plan = by_name(actc.explain(mlp(), x, memory_budget="2bit", min_bytes=1024, recompute_credit=True))
    assert tensors["mul_2"].kind == "recompute" and tensors["relu"].bits == 8
    assert plan.feasible and plan.bytes_after > default.bytes_after


class Checkpointed(nn.Module):
    """tanh, then Linear -> act -> Linear under torch.utils.checkpoint: the backward recomputes act(addmm)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(64, 256), act, nn.Linear(256, 64))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, torch.tanh(x), use_reentrant=False)


def test_recomputed_relu_reads_an_exact_mask():
    """passes/hoist.split_kinks: under activation checkpointing the backward recomputes relu(addmm(dequantized
    tanh)) and fc2's weight gradient reads it, a biased value (E[relu(z + e)] > relu(z)). It becomes
    where(addmm <= 0, 0, addmm) with the comparison moved into the forward as an exact mask, which the
    ReLU's own backward reads too: one mask, and no relu of dequantized data left in the backward."""
    torch.manual_seed(0)
    tensors, plan = by_name(explain(Checkpointed(nn.ReLU()), torch.randn(64, 64, requires_grad=True), min_bytes=1024))
    assert tensors["tanh"].kind == "quant" and [n for n, t in tensors.items() if t.kind == "mask"] == ["addmm_le"]
    assert "addmm_le_bits" in plan.backward_code.split("def forward(")[1].split(")")[0]
    assert "aten.relu" not in plan.backward_code and "aten.where.ScalarSelf(" in plan.backward_code


@pytest.mark.parametrize("act,bounds", [(nn.ReLU6(), (0.0, 6.0)), (nn.Hardtanh(-0.5, 0.5), (-0.5, 0.5))])
def test_recomputed_clamp_reads_exact_masks(act, bounds):
    """passes/hoist.split_kinks on Hardtanh and ReLU6 (clamp_min then clamp_max): the checkpointed backward
    recomputes clamp(addmm(dequantized tanh)) for fc2's weight gradient, biased near each bound like a ReLU.
    Both clamps become where(exact mask, bound, value), and the masks are the two that Hardtanh's own
    backward reads (addmm <= lo, addmm >= hi): no clamp of dequantized data left, no third mask."""
    torch.manual_seed(0)
    tensors, plan = by_name(explain(Checkpointed(act), torch.randn(64, 64, requires_grad=True), min_bytes=1024))
    assert tensors["tanh"].kind == "quant"
    assert sorted(n for n, t in tensors.items() if t.kind == "mask") == ["addmm_ge", "addmm_le"]
    code = plan.backward_code
    lo, hi = bounds
    assert "clamp_min.default(addmm," not in code and "clamp_max.default(clamp_min," not in code
    assert re.search(rf"clamp_min = torch.ops.aten.where.ScalarSelf\(\w+, {lo}, addmm\)", code)
    assert re.search(rf"clamp_max = torch.ops.aten.where.ScalarSelf\(\w+, {hi}, clamp_min\)", code)


@pytest.mark.parametrize("dtype,split", [(torch.float32, 1), (torch.int64, 0)])
def test_split_kinks_leaves_integer_clamps(dtype, split):
    """split_kinks on hand-built graphs: a float clamp_min recomputed in the backward from a saved tensor is
    split; an integer one (position ids, T5's buckets) is left alone, since where(mask, 0.0, x) would turn
    it to float and it reads no compressed data."""
    from actc.passes.hoist import split_kinks

    def graphs():
        x = torch.arange(-4, 4).to(dtype)
        fw, bw = torch.fx.Graph(), torch.fx.Graph()
        for g in (fw, bw):
            ph = g.placeholder("x")
            ph.meta["val"] = x
            kink = g.call_function(torch.ops.aten.clamp_min.default, (ph, 0))
            kink.meta["val"] = x.clamp_min(0)
            g.output((kink,))
        return torch.fx.GraphModule({}, fw), torch.fx.GraphModule({}, bw)

    fw, bw = graphs()
    assert split_kinks(fw, bw) == split
    targets = {n.target for n in bw.graph.nodes if n.op == "call_function"}
    assert (torch.ops.aten.clamp_min.default in targets) == (split == 0)


def test_masks_are_one_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.5), nn.Linear(256, 8))
    tensors, _ = by_name(explain(model, torch.randn(32, 64), min_bytes=1024))
    masks = [t for t in tensors.values() if t.kind == "mask"]
    assert len(masks) == 1 and masks[0].dtype == "bool" and masks[0].bits == 1
    assert masks[0].bytes_before == 32 * 256 and masks[0].bytes_after == 32 * 256 // 8


@pytest.mark.slow  # 40-80 s on 2 cores; the quick command skips it
def test_attention_aliases_compressed_once_at_the_root():
    torch.manual_seed(0)
    model = TinyGPT(vocab=32, width=64, layers=1, heads=2, context=32)
    tensors, plan = by_name(explain(model, torch.randint(0, 32, (4, 32)), min_bytes=1024))
    roots = [t for t in tensors.values() if t.reason.startswith("root of")]
    assert roots, "q, k and v are views of one qkv matmul output"
    qkv = roots[0]
    assert qkv.shape == "(128, 192)" and qkv.reason.count("%") == 3
    assert qkv.bytes_before == 128 * 192 * 4  # the root's storage, counted once for the three views
    # the softmax logsumexp is a statistic and stays exact
    stats = [t for t in tensors.values() if "statistic" in t.reason]
    assert stats and all(t.kind == "skip" for t in stats)


def test_a_convolution_input_is_quantized_after_the_convolution():
    """Inductor lowers the forward in graph order. Quantized before the convolution that reads it, the max-pool
    output's flat view froze its buffer contiguous, and the convolution, which Inductor's layout optimization
    feeds channels-last, needed a layout copy of its input (a kernel on the Triton path, ConvNet's forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 3, padding=1))
    tensors, plan = by_name(explain(model, torch.randn(4, 3, 16, 16), min_bytes=1024))
    (pooled,) = [t.name for t in tensors.values() if t.kind == "quant" and t.shape == "(4, 16, 8, 8)"]
    lines = plan.forward_code.splitlines()
    conv = next(i for i, line in enumerate(lines) if f"convolution.default({pooled}," in line)
    flat = next(i for i, line in enumerate(lines) if f"view.default({pooled}, [-1])" in line)
    assert conv < flat


def test_parameter_derived_tensors_are_left_alone():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            # like an AMP weight cast, computed only from a parameter; a matmul, so the partitioner saves it
            return F.linear(torch.tanh(x), self.w @ self.w.t())

    x = torch.randn(64, 64, requires_grad=True)
    tensors, plan = by_name(explain(Scaled(), x, min_bytes=1024))
    derived = [t for t in tensors.values() if t.reason == "parameter-derived"]
    assert len(derived) == 1 and derived[0].kind == "skip" and not derived[0].activation
    assert f"{derived[0].name}_codes" not in plan.forward_code
    assert tensors["tanh"].kind == "quant"


@pytest.mark.parametrize("budget,bits", [("8bit", 8), ("4bit", 4), ("1bit", 1)])
def test_average_bit_budgets(budget, bits):
    tensors, plan = by_name(explain(mlp(), torch.randn(32, 64), memory_budget=budget, min_bytes=1024))
    # the GELU input (addmm) is held to >= 4 bits (test_nonlinear_consumers_keep_a_fine_step)
    assert {n: t.bits for n, t in tensors.items() if t.kind == "quant"} == {
        n: max(bits, 4) if n == "addmm" else bits for n, t in tensors.items() if t.kind == "quant"}


def test_fraction_budget_is_met_and_can_keep_tensors():
    tensors, plan = by_name(explain(mlp(), torch.randn(32, 64), memory_budget=0.1, min_bytes=1024))
    assert plan.feasible and plan.bytes_after <= 0.1 * plan.bytes_before
    tensors, plan = by_name(explain(mlp(), torch.randn(32, 64), memory_budget=1.0, min_bytes=1024))
    assert all(t.kind in ("keep", "skip", "recompute") for t in tensors.values())
    # only the GELU output, recomputed from the (here exact) GELU input, is not saved
    assert plan.bytes_after == plan.bytes_before - tensors["mul_2"].bytes_before


def test_infeasible_budget_warns_once_and_uses_the_tightest_plan(caplog):
    with caplog.at_level(logging.WARNING, logger="actc"):
        tensors, plan = by_name(explain(mlp(), torch.randn(32, 64), memory_budget=1024, min_bytes=1024))
    assert not plan.feasible
    assert {n: t.bits for n, t in tensors.items() if t.kind == "quant"} == {
        n: 4 if n == "addmm" else 1 for n, t in tensors.items() if t.kind == "quant"}
    warnings = [r for r in caplog.records if "cannot be met" in r.getMessage()]
    assert len(warnings) == 1 and "1024" in warnings[0].getMessage()


def test_payoff_threshold_and_integer_tensors():
    class Indexed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 64)

        def forward(self, idx):
            return torch.tanh(self.emb(idx)).max(dim=1).values

    tensors, _ = by_name(explain(Indexed(), torch.randint(0, 100, (16, 40)), min_bytes=1024))
    ints = [t for t in tensors.values() if t.dtype in ("int64", "int32")]
    assert ints and all(t.kind == "skip" and "kept exact" in t.reason for t in ints if t.activation)
    tensors, _ = by_name(explain(Indexed(), torch.randint(0, 100, (16, 40)), min_bytes=10**9))
    assert all(t.kind == "skip" for t in tensors.values())
    assert any("below payoff" in t.reason for t in tensors.values())


def test_uuid_covers_options_and_session_state():
    def uuid(**options):
        return ActcPartitioner(Session(ActcConfig.from_options(options, env={}))).uuid()

    # static allocation (the default) under a scale-free budget: a graph's plan depends only on the options and
    # the code, so a rerun of the same script hits the cache
    assert uuid(memory_budget="2bit") == uuid(memory_budget="2bit")
    assert uuid(memory_budget="2bit", allocation="static") == uuid(memory_budget="2bit", allocation="static")
    assert uuid(memory_budget="2bit", allocation="static") != uuid(memory_budget="4bit", allocation="static")
    # an absolute budget is shared with the session's other graphs, and adaptive graphs feed the session's
    # statistics: a cached artifact from another session must never be served
    assert uuid(memory_budget="1MB", allocation="static") != uuid(memory_budget="1MB", allocation="static")
    assert uuid(memory_budget="2bit", allocation="adaptive") != uuid(memory_budget="2bit", allocation="adaptive")


def test_internal_error_falls_back_and_training_continues(monkeypatch, caplog):
    import actc.passes.partition as partition

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(partition, "rewrite", broken)
    with caplog.at_level(logging.WARNING, logger="actc"):
        explanation = actc.explain(mlp(), torch.randn(32, 64), min_bytes=1024)
    assert "boom" in explanation.plans[0].error
    assert sum("uncompressed" in r.getMessage() for r in caplog.records) == 1


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = TinyGPT(vocab=64, width=64, layers=1, heads=2, context=32)

    def forward(self, idx, targets):
        return F.cross_entropy(self.gpt(idx).flatten(0, 1), targets.flatten())


@pytest.mark.slow  # 40-80 s on 2 cores; the quick command skips it
def test_nonlinear_consumers_keep_a_fine_step():
    """Rounding noise averages out only through a backward that is linear in the saved tensor. The logits reach
    exp (log-softmax backward) and q/k the attention backward's softmax: >= 8 bits. GELU's input reaches erf: >= 4."""
    idx, targets = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    tensors, plan = by_name(explain(LM(), idx, targets, memory_budget="2bit", min_bytes=1024))
    by_consumer = {}
    for t in tensors.values():
        if t.kind == "quant":
            by_consumer.setdefault(t.consumer, []).append(t)
    logits = [t for t in by_consumer["exp"] if t.shape == "(128, 64)"]
    qkv = [t for t in by_consumer["exp"] if t.reason.startswith("root of")]
    gelu = by_consumer["smooth"]
    assert len(logits) == 1 and len(qkv) == 1 and len(gelu) == 1 and gelu[0].shape == "(128, 256)"
    assert all(t.bits == 8 and ">= 8 bits" in t.reason for t in logits + qkv)
    assert gelu[0].bits == 4 and "read by erf" in gelu[0].reason
    # everything else is read linearly (matmul operands, layer norm, attention v/out) and gets the budget's 2
    rest = by_consumer["linear"] + by_consumer.get("other", [])
    assert len(rest) >= 5 and all(t.bits == 2 for t in rest)
    # the "2bit" budget counts the held tensors at their narrowest allowed width, so the rest is not squeezed
    assert plan.feasible and plan.bytes_after <= plan.budget_bytes

    # with no width fine enough, they stay exact, and say why
    tensors, _ = by_name(explain(LM(), idx, targets, memory_budget="2bit", bits=[1, 2], min_bytes=1024))
    held = [t for t in tensors.values() if "allow none" in t.reason]
    assert len(held) == 3 and all(t.kind == "skip" and t.bytes_after == t.bytes_before for t in held)


def _consumer(backward):
    """consumer_class of ``saved`` in the aten graph of ``backward(saved, tangents)``."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from actc.passes.candidates import consumer_class

    def traced(saved, tangents):  # placeholder names as in AOTAutograd's backward: saved_1, tangents_1
        return backward(saved, tangents)

    torch.manual_seed(0)
    gm = make_fx(traced)(torch.randn(8, 16), torch.randn(8, 16))
    return consumer_class(gm, ["saved_1"])


W = torch.randn(16, 16)


@pytest.mark.parametrize("backward, expected", [
    # weight gradient and a mask-free elementwise scale: linear in the saved tensor
    (lambda x, g: (g.t() @ x, g * 2), ("linear", "")),
    (lambda x, g: g * x.sum(), ("other", "")),
    # LayerNorm's backward multiplies x̂ by a reduction of g·x̂: the squared error is divided by the width
    (lambda x, g: x * (g * x).mean(-1, keepdim=True) - g, ("other", "")),
    # log-softmax backward and a recomputed softmax: exp of the noisy value
    (lambda x, g: g - torch.exp(x - x.amax(-1, keepdim=True)) * g.sum(-1, keepdim=True), ("exp", "exp")),
    (lambda x, g: torch.ops.aten._log_softmax_backward_data(g, x, 1, torch.float32), ("exp", "_log_softmax_backward_data")),
    # a BatchNorm recomputed in the backward: its variance (a sum of squares) from the noisy value
    (lambda x, g: g * torch.rsqrt(torch.var_mean(x, 0, correction=0)[0] + 1e-5), ("stat", "var_mean")),
    (lambda x, g: g * torch.rsqrt((x * x).mean(0) + 1e-5), ("stat", "mean")),
    # GELU's backward: erf of x and the Gaussian exp(-x²/2), bounded: smooth
    (lambda x, g: g * (0.5 * (1 + torch.erf(x * 0.7071)) + x * torch.exp(-0.5 * x * x) * 0.3989), ("smooth", "erf")),
    (lambda x, g: g * torch.exp(-0.5 * x * x), ("smooth", "exp")),
    (lambda x, g: g / x, ("smooth", "div")),
    # tanh's backward, as an op and decomposed: the square of the noisy output meets g element by element
    (lambda y, g: torch.ops.aten.tanh_backward(g, y), ("smooth", "tanh_backward")),
    (lambda y, g: g * (1 - y * y), ("smooth", "mul")),
    # a matmul recomputed in the backward feeding exp (a logit recompute) is still exp
    (lambda x, g: torch.exp(x @ W) * g, ("exp", "exp")),
])
def test_consumer_class(backward, expected):
    assert _consumer(backward) == expected


@pytest.mark.parametrize("forward, expected", [
    (lambda x: torch.var_mean(x, (0, 2), correction=0), True),   # BatchNorm: a (var, mean) per channel
    (lambda x: (x * x).mean(-1, keepdim=True), True),              # RMSNorm: a mean of squares per row
    (lambda x: x.pow(2).sum(-1), True),
    (lambda x: x.mean(-1), False),                                 # a mean alone is linear in x
    (lambda x: (x * x).sum(0), False),                             # 4 values per result: not a statistic
])
def test_is_statistic(forward, expected):
    from torch.fx.experimental.proxy_tensor import make_fx
    from actc.passes import reach
    from actc.passes.candidates import is_statistic

    gm = make_fx(forward)(torch.randn(4, 8, 64))
    found = [is_statistic(n) for n in gm.graph.nodes if n.op == "call_function" and reach.op_name(n) in
             ("var_mean", "mean", "sum")]
    assert found == [expected]


def test_statistics_recomputed_in_the_backward_keep_a_fine_step():
    """The allocator never gives a stat/exp consumer fewer than 8 bits, nor a smooth one fewer than 4; a
    select consumer (a recomputed max-pool) no width at all: only full precision."""
    from actc.config import ActcConfig
    from actc.passes.candidates import MIN_BITS, Saved
    from actc.passes.partition import _candidate

    assert MIN_BITS == {"linear": 1, "other": 1, "smooth": 4, "stat": 8, "exp": 8, "select": 64}
    node = torch.fx.Graph().placeholder("x")
    node.meta["val"] = torch.empty(4096)
    for consumer, widths in [("select", [32]), ("stat", [8, 32]), ("smooth", [4, 8, 32]), ("linear", [1, 2, 4, 8, 32])]:
        rec = Saved(node=node, aliases=[node], kind="quant", numel=4096, full_bytes=4 * 4096, consumer=consumer)
        assert sorted(_candidate(rec, ActcConfig()).bytes_at_bits) == widths


def _broadcast(backward, saved_shape=(8, 16)):
    """broadcast_factor of ``saved`` in the aten graph of ``backward(saved, tangents)``, tangents (4, 8, 16)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from actc.passes.candidates import broadcast_factor

    def traced(saved, tangents):
        return backward(saved, tangents)

    gm = make_fx(traced)(torch.randn(saved_shape), torch.randn(4, 8, 16))
    return broadcast_factor(gm, ["saved_1"])


@pytest.mark.parametrize("backward, saved_shape, expected", [
    (lambda p, g: g * (g + p), (8, 16), 4.0),                          # added to a batch: 4 rows share it
    (lambda p, g: (g * p.expand(4, 8, 16)).sum(0), (8, 16), 4.0),     # an explicit expand
    (lambda p, g: (g.sum(0) * p.t().t()).sum(), (8, 16), 1.0),         # views, then same-size pointwise
    (lambda x, g: g * x.sum(-1, keepdim=True), (4, 8, 16), 1.0),       # a reduction is not a broadcast
    (lambda x, g: g.flatten(0, 1).t() @ x.flatten(0, 1), (4, 8, 16), 1.0),  # a matmul operand
])
def test_broadcast_factor(backward, saved_shape, expected):
    assert _broadcast(backward, saved_shape) == expected


@pytest.mark.slow  # 40-80 s on 2 cores; the quick command skips it
def test_broadcast_tensors_weigh_as_their_broadcast():
    """A position embedding (context x width) is added to every row of the batch; its rounding error is the
    same in all of them, so its default weight is its numel times the batch, and the plan says why."""
    idx, targets = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    tensors, _ = by_name(explain(LM(), idx, targets, memory_budget="2bit", min_bytes=1024))
    pos = [t for t in tensors.values() if t.kind == "quant" and t.shape == "(32, 64)" and t.producer == "embedding"]
    assert len(pos) == 1 and pos[0].weight == 32 * 64 * 4 and "broadcast x4" in pos[0].reason
    tok = [t for t in tensors.values() if t.kind == "quant" and t.shape == "(4, 32, 64)" and t.producer == "embedding"]
    assert len(tok) == 1 and tok[0].weight == 4 * 32 * 64 and "broadcast" not in tok[0].reason
