"""Shared helpers for the end-to-end and robustness tests: seeded training runs under a torch.compile
backend, gradient comparison, and saved-bytes measurement.

Inductor's caches are disabled at import so that every compile really runs actc's partitioner (a cache
hit would skip it and the test would compare inductor with itself).
"""
from __future__ import annotations

import os

os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (setup.cfg: -n 2) each worker gets its share of the cores for torch's intra-op threads:
# two workers with a thread per core each would oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from actc.measure import saved_bytes  # noqa: E402

# dynamo_pgo prints a UserWarning on every compile when caches are force-disabled: noise only.
warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")


@dataclass
class Run:
    """What a short training run leaves behind."""

    losses: list[float]
    first_output: Any                      # output of the first forward (detached)
    first_grads: torch.Tensor              # all parameter grads of step 1, flattened and concatenated
    grads: list[torch.Tensor] = field(default_factory=list)  # flattened grads after every step
    draws: list[torch.Tensor] = field(default_factory=list)  # grads of extra seeded passes before training
    model: torch.nn.Module | None = None
    compiled: Any = None


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).clone() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in model.parameters() if p.requires_grad])


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if hasattr(out, "logits"):  # transformers ModelOutput
        return out.logits.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o) for o in out)
    return out


def train_steps(model_fn: Callable[[], torch.nn.Module], backend: str, options: dict | None,
                batches: Sequence[tuple], loss_fn: Callable[[Any, tuple], torch.Tensor], steps: int = 2,
                seed: int = 0, lr: float = 0.1, dynamic: bool | None = None, reset: bool = True,
                fullgraph: bool = False, draws: int = 0) -> Run:
    """Build the model (``model_fn`` seeds its own init), compile it with ``backend`` and ``options``, and run
    ``steps`` SGD steps on ``batches`` (cycled). ``torch.manual_seed(seed)`` is set right before the first
    forward, so dropout masks and actc's stochastic rounding draw from the same generator state on every
    backend. ``batches[i]`` is a tuple of model inputs followed by a target; ``loss_fn(output, batch)``.

    Returns the loss of every step (measured before that step's update), the first forward's output and the
    flattened parameter grads of the first step. With ``draws`` > 0, that many forward/backward passes on the
    first batch run before training, under ``torch.manual_seed(1000 + i)``, and their grads are kept: at the
    same seed every backend draws the same dropout masks, so they isolate actc's rounding noise.
    """
    if reset:
        torch._dynamo.reset()
    model = model_fn()
    model.train()
    compiled = torch.compile(model, backend=backend, options=options, dynamic=dynamic, fullgraph=fullgraph)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    extra = []
    for i in range(draws):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(1000 + i)
        loss_fn(compiled(*batches[0][:-1]), batches[0]).backward()
        extra.append(flat_grads(model))
    torch.manual_seed(seed)
    losses, grads, first_output = [], [], None
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        out = compiled(*batch[:-1])
        loss = loss_fn(out, batch)
        loss.backward()
        if step == 0:
            first_output = _detach(out)
        losses.append(loss.item())
        grads.append(flat_grads(model))
        opt.step()
    return Run(losses=losses, first_output=first_output, first_grads=grads[0], grads=grads, model=model,
               compiled=compiled, draws=extra)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened gradients, computed in fp64 (bf16/fp16 grads included)."""
    return torch.nn.functional.cosine_similarity(a.double().reshape(-1), b.double().reshape(-1), dim=0).item()


def measure_saved(model_fn: Callable[[], torch.nn.Module], backend: str, options: dict | None,
                  inputs: tuple, loss_fn: Callable[[Any], torch.Tensor] | None = None, seed: int = 0) -> int:
    """Bytes the compiled forward keeps for the backward (params, buffers and inputs excluded).

    Only the forward runs inside the hooks; one backward runs afterwards so that the compiled graph is
    exercised end to end (and a broken backward fails here, not silently).
    """
    torch._dynamo.reset()
    model = model_fn()
    model.train()
    compiled = torch.compile(model, backend=backend, options=options)
    exclude = (*model.parameters(), *model.buffers(), *[i for i in inputs if isinstance(i, torch.Tensor)])
    torch.manual_seed(seed)
    nbytes, out = saved_bytes(lambda: compiled(*inputs), exclude)
    out = out.logits if hasattr(out, "logits") else out
    (loss_fn(out) if loss_fn is not None else out.float().square().mean()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    return nbytes


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from a clean dynamo state (module fixtures reset on their own)."""
    yield
    torch._dynamo.reset()


def assert_unbiased(diffs: Sequence[torch.Tensor], label: str) -> None:
    """The errors of K gradient draws against the exact gradient, d_i, average out as an unbiased estimator's:
    E|mean d|^2 = E|d|^2 / K, and a bias b adds |b|^2 that no averaging removes. Allowed: 1.5x the unbiased
    value (the norms sum thousands of coordinates, so their spread is a few percent)."""
    single = (sum(d.double().norm() ** 2 for d in diffs) / len(diffs)).sqrt().item()
    mean = (sum(diffs) / len(diffs)).double().norm().item()
    print(f"\n[{label}] 2bit error norm: one draw {single:.4g}, mean of {len(diffs)} {mean:.4g}, "
          f"unbiased expectation {single / len(diffs) ** 0.5:.4g}")
    assert mean <= 1.5 * single / len(diffs) ** 0.5
