"""The tensor at a graph break: compressed on both sides, and freed.

Before, a graph break cost the compression of the tensor that crosses it: the first graph saved it as a
"user output", the second as a "primal", both at full precision. Now the second graph quantizes its input
when the input is an activation (requires grad, not a leaf: ``backend.activation_inputs``), and the
first graph compresses what it saves even when it also returns it. The user's batch and leaves stay as
they are. Live memory after the forward (the profiler's allocations, net of frees) shows that the
uncompressed tensor is really gone, which saved bytes alone cannot show.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import actc
from actc.config import ActcConfig
from actc.kernels import quant
from actc.measure import saved_bytes

WIDTH, BATCH = 256, 64


class Broken(nn.Module):
    """Two Linear -> GELU layers and a head, with a graph break after each layer."""

    def __init__(self, breaks: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 10)
        self.breaks = breaks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        if self.breaks:
            torch._dynamo.graph_break()
        x = F.gelu(self.fc2(x))
        if self.breaks:
            torch._dynamo.graph_break()
        return self.head(x)


def _model(breaks: bool = True) -> Broken:
    torch.manual_seed(0)
    return Broken(breaks)


def _input(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1)).requires_grad_(requires_grad)


def _compiled(model, backend, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, options=options) if backend == "actc" else \
        torch.compile(model, backend=backend)


def _live_after_forward(compiled, x) -> int:
    """Bytes allocated during the forward and not freed when it returns: the saved tensors and the output."""
    compiled(x).sum().backward()  # compile first
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = compiled(x)
    live = sum(e.self_cpu_memory_usage for e in prof.events())
    out.sum().backward()
    return live


def test_the_input_after_a_break_is_compressed_and_the_batch_is_not():
    plans = actc.explain(_model(), _input(requires_grad=True), memory_budget="2bit", recompute=1.0).plans
    assert len(plans) == 3
    inputs = {p.graph: [t for t in p.tensors if t.producer == "placeholder" and t.dtype == "float32"
                        and t.shape == str((BATCH, WIDTH))] for p in plans}
    # graph 0 saves the batch (a leaf the caller holds) exactly; graphs 1 and 2 compress their input
    batch = inputs[plans[0].graph]
    assert batch and all(t.kind == "skip" and t.reason == "primal" for t in batch), batch
    crossing = [t for p in plans[1:] for t in inputs[p.graph]]
    assert len(crossing) == 2 and all(t.bits == 2 and t.bytes_after < t.bytes_before / 10 for t in crossing), crossing
    assert all("_codes" in p.forward_code for p in plans[1:])


def test_a_saved_tensor_that_is_also_returned_is_compressed():
    class ReturnsSaved(nn.Module):  # the ReLU output is saved (for fc2's weight) and returned across the break
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            h = torch.sigmoid(self.fc1(x))
            y = self.fc2(h)
            torch._dynamo.graph_break()
            return (y * h).sum()

    torch.manual_seed(0)
    plans = actc.explain(ReturnsSaved(), _input(), memory_budget="2bit", recompute=1.0).plans
    returned = [t for t in plans[0].tensors if "returned by the graph" in t.reason]
    assert returned and all(t.kind == "quant" and t.bits < 32 for t in returned), plans[0].tensors


@pytest.mark.slow
def test_memory_across_breaks_is_near_one_graph():
    """Saved bytes count what autograd holds; live memory after the forward also counts what nothing should
    hold any more. Each break costs at most the 2-bit copy of the tensor that crosses it (one graph
    recomputes that GELU output from the saved pre-activation; across a break it must be stored), and
    both stay far below Inductor's."""
    x = _input()
    saved, live = {}, {}
    for name, breaks in (("actc", False), ("actc", True), ("inductor", True)):
        compiled = _compiled(_model(breaks), name)
        live[name, breaks] = _live_after_forward(compiled, x)
        saved[name, breaks], out = saved_bytes(lambda: compiled(x), (*_model().parameters(), x))
        out.sum().backward()
    print("saved", saved, "live", live)
    crossing = quant.compressed_bytes(BATCH * WIDTH, 2, ActcConfig().group_size, torch.float32)
    for measured in (saved, live):
        assert measured["actc", True] <= measured["actc", False] + 2 * crossing, (measured, crossing)
        assert measured["actc", True] * 5 < measured["inductor", True], measured


@pytest.mark.parametrize("options", [{"memory_budget": "8bit"}, pytest.param({}, marks=pytest.mark.slow)],
                         ids=["8bit", "default"])
def test_gradient_across_breaks_matches_inductor(options):
    x = _input()
    grads = {}
    for name in ("inductor", "actc"):
        model = _model()
        _compiled(model, name, **options)(x).pow(2).mean().backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    cos = F.cosine_similarity(grads["actc"], grads["inductor"], dim=0).item()
    # 8 bits: the bound. 2 bits (the default): one draw of unbiased noise on a 2-layer MLP,
    # whose cosine sits near 0.99 (docs/results.md); 0.95 catches a biased or dropped gradient
    assert cos >= (0.999 if options else 0.95), cos



class MaskedScores(nn.Module):
    """Causal attention scores, -inf above the diagonal, cross a graph break into the softmax."""

    def __init__(self, width: int = 64, length: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        scores = scores + torch.full((self.length, self.length), float("-inf")).triu(1)
        torch._dynamo.graph_break()
        return F.softmax(scores, -1) @ self.v(x)


def test_masked_scores_across_a_break_stay_exact():
    """The second graph's input holds -inf beside finite scores (the mask was added before the break, where
    extreme_values cannot see it), and Inductor's recompute budget makes the backward recompute the softmax
    from it. A group of -inf and finite values has no step: quantized, each finite score would come back as
    the group's greatest, a uniform attention row and a silently wrong gradient. At the default options the
    plan keeps it exact and says why; the gradient is Inductor's (no NaN, cosine >= 0.999 at 8 bits)."""
    torch.manual_seed(0)
    x = torch.randn(8, 32, 64)
    plans = actc.explain(MaskedScores(), x).plans
    crossing = [t for t in plans[1].tensors if t.producer == "placeholder" and "earlier graph" in t.reason]
    assert len(crossing) == 1 and crossing[0].kind == "skip" and "-inf" in crossing[0].reason, plans[1].tensors
    grads = {}
    for name, options in (("inductor", {}), ("default", {}), ("8bit", {"memory_budget": "8bit"})):
        torch.manual_seed(0)
        model = MaskedScores()
        _compiled(model, "inductor" if name == "inductor" else "actc", **options)(x).square().mean().backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.isfinite(grads["inductor"]).all()
    for name in ("default", "8bit"):
        assert torch.isfinite(grads[name]).all(), name
        cos = F.cosine_similarity(grads[name], grads["inductor"], dim=0).item()
        # 8 bits: the bound; the default's 2-bit q/k/v projections: one unbiased draw (0.95, as above)
        assert cos >= (0.999 if name == "8bit" else 0.95), (name, cos)
