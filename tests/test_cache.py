"""A rerun of a training script hits Inductor's compile caches under actc's default options (issue 16).

Each run is a fresh process sharing one cache directory, as two runs of a user's script would. The second
run must hit the AOTAutograd and FX-graph caches (no partition, no code generation), train bit-identically,
and still save compressed tensors; other options must miss. conftest.py disables the caches for the other
tests, so the subprocesses get an environment without that switch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.nn as nn
    import actc
    from torch._dynamo.utils import counters
    from actc.measure import saved_bytes

    options = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
    compiled = torch.compile(model, backend="actc", options=options)
    x = torch.randn(32, 64)
    torch.manual_seed(1)
    nbytes, out = saved_bytes(lambda: compiled(x), exclude=tuple(model.parameters()) + (x,))
    out.square().mean().backward()
    print(json.dumps({"fx": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]), "saved": nbytes,
                      "grad": [p.grad.sum().item() for p in model.parameters()]}))
""")
FULL_SAVED = 32 * 256 * 4 * 2  # what inductor saves here: the first Linear's output and GELU's, fp32


def _run(cache_dir, options: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_FORCE_DISABLE_CACHES"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(options)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # three fresh processes: 40-90 s on 2 cores
def test_a_rerun_hits_the_compile_caches_under_the_default_options(tmp_path):
    options = {"min_bytes": 1024}  # the defaults, with this toy model's tensors big enough to compress
    first, again = _run(tmp_path, options), _run(tmp_path, options)
    assert first["aot"].get("autograd_cache_miss") == 1 and first["fx"].get("fxgraph_cache_miss") == 2
    assert again["aot"].get("autograd_cache_hit") == 1 and again["fx"].get("fxgraph_cache_hit") == 2
    assert again["grad"] == first["grad"]  # the same code, the same seeds: bit-identical
    assert again["saved"] == first["saved"] < FULL_SAVED / 4  # the cached code still compresses
    other = _run(tmp_path, {**options, "memory_budget": "4bit"})
    assert other["aot"].get("autograd_cache_miss") == 1 and "autograd_cache_hit" not in other["aot"]
