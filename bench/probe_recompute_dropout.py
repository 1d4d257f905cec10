"""Does Inductor's recompute budget keep dropout's mask? One SGD step, Inductor alone, budget 0.3 vs 1.0.

    python bench/probe_recompute_dropout.py

torch 2.13.0+cpu printed: dropout 0.0: cosine 1.000000; dropout 0.1: cosine 0.902284, forwards identical.
The forward is the same and the gradient is not: the backward recomputes dropout with another mask. actc's
partitioner therefore tags every random draw MUST_SAVE before partitioning (compat.keep_saved), so
that under its ``recompute`` option the seed is saved and the mask replays (tests/test_recompute.py).
"""
import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # every compile really partitions

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def grads(p: float, budget: float):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    compiled = torch.compile(model, backend="inductor")
    with torch._functorch.config.patch(activation_memory_budget=budget):
        torch.manual_seed(0)
        out = compiled(x)
        F.cross_entropy(out, y).backward()
    return out.detach(), torch.cat([q.grad.reshape(-1) for q in model.parameters()])


if __name__ == "__main__":
    for p in (0.0, 0.1):
        (out_a, a), (out_b, b) = grads(p, 1.0), grads(p, 0.3)
        cos = F.cosine_similarity(a, b, dim=0).item()
        print(f"dropout {p}: cosine {cos:.6f}, forwards identical {torch.equal(out_a, out_b)}")
