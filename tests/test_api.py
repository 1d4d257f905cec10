"""What a user meets first: actc.compile, its early errors, torch.compile's mode, and the TORCH_LOGS switch."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import actc
from actc import _torch_compat as compat
from actc.config import ActcOptionError


class Tiny(nn.Module):
    """A user's own module (nn.Module.compile on a bare nn.Sequential is not traced on torch 2.13)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _compressed(records) -> bool:
    return any(r.name == "actc" and "saved activations compressed" in r.getMessage()
               and not r.getMessage().startswith("actc graph 0: 0/") for r in records)


def test_compile_is_in_place_and_compresses(caplog):
    torch.manual_seed(0)
    m = Tiny()
    assert actc.compile(m, memory_budget="2bit", min_bytes=1024) is m
    with caplog.at_level(logging.INFO, logger="actc"):
        m(torch.randn(32, 64)).sum().backward()
    assert _compressed(caplog.records), [r.getMessage() for r in caplog.records]
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("options, fragment", [
    ({"memory_budgt": "2bit"}, "did you mean 'memory_budget'"),
    ({"memory_budget": 1}, "'1bit'"),
    ({"memory_budget": "2bit", "mode": "fastest"}, "should be one of: default"),
])
def test_bad_option_raises_at_compile_not_at_the_first_step(options, fragment):
    m = Tiny()
    with pytest.raises(ActcOptionError, match=fragment):
        actc.compile(m, **options)
    assert not hasattr(m, "_compiled_call_impl") or m._compiled_call_impl is None  # nothing was compiled


def test_compile_takes_a_module():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        actc.compile(lambda x: x)


@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", None])
def test_mode_is_applied_as_inductor_applies_it(monkeypatch, mode):
    """torch.compile(backend="actc", mode=...) hands the mode to the backend; its Inductor options reach
    compile_fx beside actc's partitioner."""
    seen = []
    real = compat.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(compat, "compile_fx", spy)
    m = Tiny()
    compiled = torch.compile(m, backend="actc", mode=mode)
    compiled(torch.randn(32, 64)).sum().backward()
    expected = torch._inductor.list_mode_options(mode) if mode else {}
    assert seen and all(p.items() >= expected.items() and "custom_partitioner_fn" in p for p in seen)
    assert mode is None or seen[0].get("max_autotune") is True


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}, **env}  # the caller's TORCH_LOGS never leaks in
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)


TRAIN = """
import torch, torch.nn as nn, actc
class Tiny(nn.Module):
    def __init__(self):
        super().__init__(); self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 8)
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
m = actc.compile(Tiny(), min_bytes=1024)
m(torch.randn(32, 64)).sum().backward()
print("done")
"""


@pytest.mark.slow  # 40-80 s on 2 cores; the quick command skips it
def test_torch_logs_shows_the_plan_and_the_default_is_quiet():
    quiet = _run(TRAIN)
    assert quiet.returncode == 0 and "done" in quiet.stdout, quiet.stderr[-2000:]
    assert "actc" not in quiet.stderr
    info = _run(TRAIN, TORCH_LOGS="actc")
    assert "saved activations compressed" in info.stderr and "reason" not in info.stderr, info.stderr[-2000:]
    debug = _run(TRAIN, TORCH_LOGS="+actc")
    assert "saved activations compressed" in debug.stderr and "reason" in debug.stderr  # the per-tensor table


def test_version_and_log_registry():
    from torch._logging._internal import log_registry

    assert actc.__version__ and log_registry.is_log("actc")


def test_sessions_live_as_long_as_their_compiled_graphs():
    """30 options dicts made 30 sessions that nothing freed; now each lives as long as its compiled graphs."""
    import gc

    from actc import backend, session

    torch._dynamo.reset()
    gc.collect()
    before = len(session.SESSIONS)
    x = torch.randn(32, 64)
    for i in range(30):
        model = torch.compile(Tiny(), backend="actc", options={"memory_budget": "2bit", "min_bytes": 1024})
        model(x).sum().backward()
    assert len(session.SESSIONS) > before  # alive while dynamo holds the compiled graphs
    del model
    torch._dynamo.reset()
    gc.collect()
    assert len(session.SESSIONS) == before and len(backend._sessions) == 0


RACE = """
import sys, threading, torch
if sys.argv[1] == "import":
    import actc
errors, start = [], threading.Barrier(8)
def first_use():
    try:
        start.wait()
        if sys.argv[1] == "import":
            f = torch.compile(lambda x: (2 * x).sin(), backend="actc")
        else:
            f = actc.compile(torch.nn.Linear(4, 4))
        f(torch.randn(2, 4))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=first_use) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print("errors", errors)
"""


@pytest.mark.slow  # 15-50 s on 2 cores: full suite only
@pytest.mark.parametrize("route", ["import", "actc.compile"])
def test_first_use_from_threads_does_not_race(route):
    """Left to torch's lazy entry-point registration, 8 threads that first look up "actc" at once fail
    with 'duplicate name: actc' (7 of 8 on torch 2.13). `import actc` registers the name up front, and
    actc.compile passes a callable, which is never looked up by name."""
    code = RACE if route == "import" else RACE.replace('if sys.argv[1] == "import":\n    import actc', "import actc")
    run = subprocess.run([sys.executable, "-c", code, route], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "errors []" in run.stdout, run.stdout + run.stderr[-2000:]
