"""What must never break a user's training: dynamic shapes, graph breaks, inference, models with nothing to
compress, the environment-variable path, the entry point, and the dump directory."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import actc
from conftest import cosine, flat_grads


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8))


def grads_of(model: nn.Module, fn, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    fn(x).square().mean().backward()
    return flat_grads(model)


@pytest.mark.slow  # 15-50 s on 2 cores: full suite only
def test_dynamic_shapes_train_and_plan_worst_case():
    """A batch dimension marked dynamic in [2, 100] compiles once, trains at every size, and the plan is sized
    for the largest batch. A tensor that could shrink to one quantization group stays exact (Inductor would
    otherwise guard on its group count and violate the user's range)."""
    model = mlp()
    x = torch.randn(17, 64)
    torch._dynamo.mark_dynamic(x, 0, min=2, max=100)
    (plan,) = actc.explain(model, x, memory_budget="2bit", min_bytes=1024).plans
    tensors = {t.name: t for t in plan.tensors}
    assert tensors["addmm"].shape == "(s33, 256)" or tensors["addmm"].shape.endswith(", 256)")
    assert tensors["addmm"].bytes_before == 100 * 256 * 4  # the upper bound, not the example's 17 rows
    assert tensors["relu"].kind == "skip" and "one group" in tensors["relu"].reason

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="actc", options={"memory_budget": "8bit", "min_bytes": 1024})
    for batch in (17, 2, 33, 100):
        x = torch.randn(batch, 64)
        torch._dynamo.mark_dynamic(x, 0, min=2, max=100)
        got, exact = grads_of(model, compiled, x), grads_of(model, model, x)
        # 8-bit stochastic rounding: ~0.2% of a group's range per element, averaged in every weight gradient
        assert cosine(got, exact) > 0.999, batch


@pytest.mark.slow  # 15-50 s on 2 cores: full suite only
def test_dynamic_true_recompiles_nothing_for_new_sizes():
    counts = {"graphs": 0}

    def counting(gm, example_inputs):
        counts["graphs"] += 1
        from actc.backend import actc_backend
        return actc_backend(gm, example_inputs, options={"memory_budget": "4bit", "min_bytes": 1024})

    model = mlp()
    compiled = torch.compile(model, backend=counting, dynamic=True)
    for batch in (16, 24, 40, 64):
        compiled(torch.randn(batch, 64)).sum().backward()
    assert counts["graphs"] == 1


class TwoHalves(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64))
        self.b = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 8))

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h)


def test_graph_breaks_share_one_absolute_budget():
    x = torch.randn(64, 64)
    full = actc.explain(TwoHalves(), x, memory_budget=1.0, min_bytes=1024)
    assert len(full.plans) == 2
    budget = full.bytes_before // 8
    explanation = actc.explain(TwoHalves(), x, memory_budget=budget, min_bytes=1024)
    assert len(explanation.plans) == 2
    assert explanation.bytes_after <= budget  # both graphs together, not each
    assert all(p.feasible for p in explanation.plans)


def test_graph_breaks_train_like_inductor():
    x = torch.randn(32, 64)
    model = TwoHalves()
    exact = grads_of(model, model, x)
    compiled = torch.compile(model, backend="actc", options={"memory_budget": "8bit", "min_bytes": 1024})
    assert cosine(grads_of(model, compiled, x), exact) > 0.999  # 8 bits: as in the end-to-end tests


def test_inference_and_no_grad_graphs_are_untouched():
    model = mlp()
    x = torch.randn(8, 64)
    compiled = torch.compile(model, backend="actc")
    with torch.no_grad():
        out = compiled(x)
    assert torch.allclose(out, model(x), atol=1e-5, rtol=1e-5)  # Inductor's fused kernels vs eager
    model.eval()
    with torch.inference_mode():
        assert compiled(x).shape == (8, 8)


def test_nothing_to_compress():
    """The input does not need grad and the only saved tensors are the input and the weight."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    x = torch.randn(32, 64)
    (plan,) = actc.explain(model, x).plans
    assert all(t.kind == "skip" for t in plan.tensors) and plan.bytes_after == plan.bytes_before
    compiled = torch.compile(model, backend="actc")
    compiled(x).sum().backward()
    assert model.weight.grad is not None


def test_env_var_budget_reaches_the_backend(monkeypatch):
    monkeypatch.setenv("ACTC_MEMORY_BUDGET", "4bit")
    from actc.backend import session_for

    assert str(session_for(None).config.memory_budget) == "4bit"
    monkeypatch.setenv("ACTC_MEMORY_BUDGET", "lots")
    with pytest.raises(actc.ActcOptionError, match="ACTC_MEMORY_BUDGET.*'lots'"):
        session_for(None)


def test_bad_option_through_torch_compile_names_it():
    compiled = torch.compile(mlp(), backend="actc", options={"memory_budjet": "2bit"})
    with pytest.raises(Exception, match="memory_budjet.*did you mean 'memory_budget'"):
        compiled(torch.randn(4, 64))


@pytest.mark.slow  # 15-50 s on 2 cores: full suite only
def test_entry_point_needs_no_import(tmp_path):
    """`backend="actc"` is found through the torch_dynamo_backends entry point, in a process that never
    imports actc itself."""
    code = ("import torch, sys\n"
            "m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))\n"
            "torch.compile(m, backend='actc')(torch.randn(8, 16)).sum().backward()\n"
            "print('ok', 'actc.backend' in sys.modules)\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok True"


def test_dump_dir_and_logger(tmp_path, caplog):
    x = torch.randn(32, 64)
    with caplog.at_level(logging.DEBUG, logger="actc"):
        actc.explain(mlp(), x, memory_budget="2bit", min_bytes=1024, dump_dir=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert files == ["graph_000_backward.py", "graph_000_forward.py", "graph_000_plan.json", "graph_000_plan.txt"]
    plan = json.loads((tmp_path / "graph_000_plan.json").read_text())
    assert plan["bytes_after"] < plan["bytes_before"]
    assert "addmm_codes" in (tmp_path / "graph_000_forward.py").read_text()
    messages = [r.getMessage() for r in caplog.records if r.name == "actc"]
    assert any(r.levelno == logging.INFO and "saved activations compressed" in r.getMessage() for r in caplog.records)
    assert any("producer" in m and "bits" in m for m in messages)  # the table, at DEBUG


def test_a_tensor_that_cannot_be_traced_stays_exact(monkeypatch, caplog):
    """One tensor failing is logged once and left uncompressed; the others are still compressed."""
    from actc.passes import rewrite

    real = rewrite.trace_pair

    def picky(decision):
        if decision.saved.name == "addmm":
            raise RuntimeError("cannot trace this one")
        return real(decision)

    monkeypatch.setattr("actc.passes.partition.trace_pair", picky)
    with caplog.at_level(logging.WARNING, logger="actc"):
        (plan,) = actc.explain(mlp(), torch.randn(32, 64), min_bytes=1024).plans
    kinds = {t.name: t.kind for t in plan.tensors}
    assert kinds["addmm"] == "skip" and "quant" in kinds.values()
    assert sum("cannot trace this one" in r.getMessage() for r in caplog.records) == 1
