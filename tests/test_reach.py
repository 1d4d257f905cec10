"""passes/reach.py: which saved tensors are activations, and which may hold extreme values that no group of
the quantizer could give back next to ordinary ones."""
import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

import actc
from actc.passes.reach import extreme_values

NEG = torch.finfo(torch.float32).min


def _flagged(fn, *args):
    """{node name: constant} of the extreme values in ``fn``'s aten graph (make_fx fills meta["val"])."""
    gm = make_fx(fn)(*args)
    return {n.name: c for n, c in extreme_values(gm).items()}, gm


def _out(gm):
    out = gm.graph.find_nodes(op="output")[0].args[0]
    return (out[0] if isinstance(out, (list, tuple)) else out).name


S, M = torch.randn(2, 8, 8), torch.rand(2, 8, 8) > 0.5


@pytest.mark.parametrize("fill", [float("-inf"), NEG])
def test_softmax_of_masked_scores_is_clean(fill):
    """exp(-inf) = 0: the masked scores hold the fill, the probabilities after the softmax do not."""
    def f(s, m):
        scores = s + torch.where(m, 0.0, fill)
        return torch.softmax(scores, -1), scores

    flagged, gm = _flagged(f, S, M)
    probs, scores = (a.name for a in gm.graph.find_nodes(op="output")[0].args[0])
    assert scores in flagged and flagged[scores] == fill
    assert probs not in flagged


def test_the_sign_decides_what_exp_ends():
    """exp ends a negative extreme only: exp(s + where(m, 0, +inf)) may hold +inf."""
    flagged, gm = _flagged(lambda s, m: torch.exp(s + torch.where(m, 0.0, float("inf"))), S, M)
    assert _out(gm) in flagged
    flagged, gm = _flagged(lambda s, m: torch.exp(-(s + torch.where(m, 0.0, float("inf")))), S, M)
    assert _out(gm) not in flagged  # the negation makes it -inf, and exp sends that to 0


@pytest.mark.parametrize("fn, kept", [
    (lambda s, m: torch.sigmoid(s.masked_fill(m, float("-inf"))) * 2, False),  # bounded
    (lambda s, m: torch.tanh(s.masked_fill(m, float("nan"))), True),           # NaN passes every function
    (lambda s, m: (s.masked_fill(m, NEG) * s).sum(-1, keepdim=True) + s, False),  # a reduction ends it
    (lambda s, m: s.masked_fill(m, NEG) @ s, False),                           # and so does a matmul
    (lambda s, m: torch.log(s.abs() + s.masked_fill(m, NEG).abs()), True),     # |min| = max: log keeps it huge
    (lambda s, m: s.masked_fill(m, NEG) * s, True),                            # a factor of unknown sign
    (lambda s, m: s.masked_fill(m, 1e30), False),                              # 1e30 is far from fp32's limit
])
def test_extremes_follow_pointwise_ops(fn, kept):
    flagged, gm = _flagged(fn, S, M)
    assert (_out(gm) in flagged) == kept


def test_saved_masked_scores_stay_exact_and_probabilities_are_compressed():
    """End to end: attention with a float mask added to the scores. The plan keeps what holds -inf exact
    and compresses the softmax output that the backward reads (recompute=1.0: at the default recompute
    budget Inductor recomputes the softmax in the backward instead, and nothing is left to compress)."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(32, 32)

        def forward(self, x, mask):
            q = self.q(x)
            scores = q @ q.transpose(-1, -2) + torch.where(mask, 0.0, float("-inf"))
            return torch.softmax(scores, -1) @ q

    torch.manual_seed(0)
    x, mask = torch.randn(4, 64, 32), torch.tril(torch.ones(64, 64, dtype=torch.bool))
    (plan,) = actc.explain(Attn(), x, mask, memory_budget="2bit", min_bytes=1024, recompute=1.0).plans
    floats = [t for t in plan.tensors if t.dtype == "float32" and t.shape == "(4, 64, 64)"]
    assert floats and all(t.kind == "quant" for t in floats), [(t.name, t.reason) for t in floats]


def test_input_that_needs_no_grad_is_kept_exact():
    """A 3-d input x (no grad) reaches the first weight's gradient as a saved view x.view(-1, 64): a tensor
    that no gradient flows through and that the caller holds anyway, so it is not an activation.
    (recompute=1.0: at the default budget Inductor recomputes the whole first layer from x.)"""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    (plan,) = actc.explain(m, torch.randn(4, 32, 64), memory_budget="2bit", min_bytes=1024, recompute=1.0).plans
    reasons = {t.name: (t.kind, t.reason) for t in plan.tensors if t.dtype == "float32" and t.kind != "primal"}
    exact = [n for n, (k, r) in reasons.items() if r.startswith("not an activation")]
    assert exact and all(reasons[n][0] == "skip" for n in exact), reasons
    assert any(k == "quant" for k, _ in reasons.values()), reasons
