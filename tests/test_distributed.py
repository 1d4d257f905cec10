"""DDP and FSDP2 under gloo, two processes on CPU: actc trains there as it does in one process.

DDP's optimizer (dynamo's DDPOptimizer) cuts the model's graph at its gradient buckets, so the activation
that one piece hands to the next is an output of the first graph and an input of the second. actc
compresses both (``backend.activation_inputs``, and graph outputs that are saved), so the saved bytes stay
near the one-process figure. Each process takes half the batch; with a mean loss, DDP's averaged gradient
is the whole batch's gradient, which the test compares with one process computing it alone.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from actc.measure import saved_bytes

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]

WORLD = 2
BATCH = 64
# Each weight is 1 MiB (512 x 512 fp32), and the smallest bucket DDPOptimizer accepts is 1 MB (its first
# bucket may not be larger than the others), so with bucket_cap_mb=1 every layer is a bucket of its own
# and the graph is cut into pieces (one per layer).
WIDTH = 512
EIGHT_BIT = {"memory_budget": "8bit"}


class Layer(nn.Module):
    def __init__(self, act: nn.Module, width_out: int = WIDTH) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(WIDTH, width_out), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> GELU -> Linear -> ReLU -> Linear: a mask and a smooth activation at the
    cuts. FSDP2 shards it per layer: user-code blocks, which dynamo compiles one by one (FSDP2's hooks
    break the graph around each; a bare nn.Linear would run eagerly, and so would anything after a loop
    that breaks)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(nn.ReLU()), Layer(nn.GELU()), Layer(nn.ReLU()), Layer(nn.Identity(), 10)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, 10, generator=g)


def _compiled(model: nn.Module, options: dict | None) -> nn.Module:
    torch._dynamo.reset()
    if options is None:
        return torch.compile(model, backend="inductor")
    return torch.compile(model, backend="actc", options=options)


def _flat_grad(model: nn.Module) -> torch.Tensor:
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
    return torch.cat([g.reshape(-1) for g in grads])


def _saved(compiled: nn.Module, model: nn.Module, x: torch.Tensor) -> int:
    """Saved bytes of one forward of a compiled model that has already run; parameters and the input are not
    counted."""
    nbytes, out = saved_bytes(lambda: compiled(x), (*model.parameters(), x))
    out.sum().backward()
    return nbytes


def _step_losses(model: nn.Module, compiled: nn.Module, x, y, steps: int = 6) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    from torch.distributed.fsdp import fully_shard
    for layer in model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _worker(rank: int, kind: str, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        x, y = _batch()
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        result = {}
        # the 8-bit gradient of the whole batch, averaged over the two halves by DDP / FSDP2
        model = _wrap(kind, _model())
        F.mse_loss(_compiled(model, EIGHT_BIT)(x[half]), y[half]).backward()
        result["grad8"] = _flat_grad(model)
        # 2-bit training at the default options: finite, falling losses; then its saved bytes
        model = _wrap(kind, _model())
        compiled = _compiled(model, {})
        result["losses"] = _step_losses(model, compiled, x[half], y[half])
        result["actc"] = _saved(compiled, model, x[half])
        model = _wrap(kind, _model())
        compiled = _compiled(model, None)
        compiled(x[half]).sum().backward()
        result["inductor"] = _saved(compiled, model, x[half])
        # the same half in one process, without DDP / FSDP2: Inductor on rank 0, actc on rank 1 (in parallel)
        model = _model()
        compiled = _compiled(model, None if rank == 0 else {})
        compiled(x[half]).sum().backward()
        result["one"] = _saved(compiled, model, x[half])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(kind: str, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(kind, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _one_process_grad(options: dict | None) -> torch.Tensor:
    x, y = _batch()
    model = _model()
    F.mse_loss(_compiled(model, options)(x), y).backward()
    return _flat_grad(model)


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def distributed(request, tmp_path_factory):
    return request.param, _run(request.param, tmp_path_factory.mktemp(request.param))


def test_8bit_gradient_matches_one_process(distributed):
    kind, results = distributed
    reference = _one_process_grad(None)  # Inductor, the whole batch, one process
    for r in results:
        cos = F.cosine_similarity(r["grad8"], reference, dim=0).item()
        assert cos >= 0.999, f"{kind}: 8-bit gradient cosine {cos:.6f} against one process"


def test_2bit_losses_are_finite_and_fall(distributed):
    kind, results = distributed
    for r in results:
        losses = r["losses"]
        assert all(math.isfinite(v) for v in losses), f"{kind}: {losses}"
        assert losses[-1] < 0.97 * losses[0], f"{kind}: 2-bit losses do not fall: {losses}"


def test_saved_bytes_ratio_holds_across_the_split(distributed):
    """The goal (issue 14): the one-process ratio within 1.25x. DDP cuts the graph at its buckets, FSDP2's
    hooks break it around each sharded layer; either way the tensor at a cut is an input of the next graph."""
    kind, results = distributed
    one = results[0]["one"] / results[1]["one"]  # Inductor on rank 0, actc on rank 1, the same half-batch size
    for r in results:
        split = r["inductor"] / r["actc"]
        print(f"{kind}: saved bytes x less than Inductor: one process {one:.2f}, {kind} {split:.2f}")
        assert split * 1.25 >= one, f"{kind}: {split:.2f}x less than Inductor, one process {one:.2f}x"
        assert split > 4.0, f"{kind}: actc saves only {split:.2f}x less than Inductor"
