"""actc's patch of Inductor's dtype-rule handler (``_torch_compat.skip_repeated_dtype_rule_setup``) writes the
same kernels faster: the handler's rules are set up once per state of Inductor's rule tables, a rule added
later is still set up, the generated code of a compressed training step is the same with and without it, and
backend="actc" installs it where Inductor alone does not.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import torch
from torch._inductor import utils as inductor_utils  # private: 2.13
from torch._inductor.dtype_propagation import DtypePropagationOpsHandler  # private: 2.13
from torch._inductor.utils import run_and_get_code  # private: 2.11 and 2.13

from actc import _torch_compat as compat


def test_rules_are_set_up_once_per_table_state(monkeypatch):
    compat.skip_repeated_dtype_rule_setup()
    original = DtypePropagationOpsHandler.__init__.actc_original
    calls = []

    def counting(self):
        calls.append(1)
        original(self)

    init = compat.once_per_rule_tables(counting)
    handler = object.__new__(DtypePropagationOpsHandler)  # not the singleton: a fresh instance
    for _ in range(5):
        init(handler)
    assert len(calls) == 1 and handler.ne(torch.float32, torch.float32) == torch.bool
    rule = inductor_utils.OpDtypeRule(torch._prims_common.ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT, torch.int8)
    monkeypatch.setitem(inductor_utils.op_dtype_propagation_rules, "actc_test_op", rule)
    init(handler)
    assert len(calls) == 2 and handler.actc_test_op(torch.float32) == torch.int8


def _step_code() -> list[str]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    compiled = torch.compile(model, backend="actc", options={"min_bytes": 1024, "recompute": 1.0})
    x = torch.randn(16, 32)
    _, codes = run_and_get_code(lambda: compiled(x).square().mean().backward())
    return [_comparable(code) for code in codes]


def _comparable(code: str) -> str:
    """A wrapper without what differs between two compiles of one graph: the AOT id (a counter, first line)
    and the temporary folder in each kernel's path (its file name, a hash of its source, stays)."""
    return re.sub(r"(# kernel path: )\S*/", r"\1", code.split("\n", 1)[1])


def with_and_without(code, monkeypatch) -> tuple[list[str], list[str]]:
    """``code()`` (the wrappers of one compile) with the patch installed, then with Inductor's own __init__ back
    and actc's backend kept from installing it again. Used here and in test_triton_path.py."""
    compat.skip_repeated_dtype_rule_setup()
    patched = code()
    monkeypatch.setattr(DtypePropagationOpsHandler, "__init__", DtypePropagationOpsHandler.__init__.actc_original)
    monkeypatch.setattr(compat, "skip_repeated_dtype_rule_setup", lambda: None)
    return patched, code()


def test_same_generated_code_with_and_without(monkeypatch):
    """C++ here; the Triton path's twin is in test_triton_path.py (it needs the interpreter's process)."""
    patched, unpatched = with_and_without(_step_code, monkeypatch)
    assert len(patched) == 2 and str(0x21F0AAAD) in patched[0]  # the forward rounds (kernels/noise.py's hash)
    assert patched == unpatched


def test_installed_by_actcs_compile_only():
    """Users get the patch from backend="actc" (no import of actc needed); a process that compiles with
    Inductor alone keeps Inductor's own __init__."""
    script = textwrap.dedent("""
        import sys, torch
        from torch._inductor.dtype_propagation import DtypePropagationOpsHandler as Handler
        model = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
        torch.compile(model, backend=sys.argv[1])(torch.randn(4, 8)).sum().backward()
        print(hasattr(Handler.__init__, "actc_original"))
    """)
    for backend, patched in (("inductor", False), ("actc", True)):
        run = subprocess.run([sys.executable, "-c", script, backend], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split()[-1] == str(patched), (backend, run.stdout)
