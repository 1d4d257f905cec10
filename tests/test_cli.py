"""`actc dump` on a fixture file, in text and json, and its errors; `actc demo`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from actc.cli import main
from actc.models import counting_task

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_model.py")


def test_dump_text(capsys):
    """The table comes first, rows name their module, primals are hidden; --graphs adds the graphs."""
    assert main(["dump", f"{FIXTURE}:make", "--budget", "4bit", "--option", "min_bytes=1024"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0]
    for column in ("module", "name", "shape", "dtype", "producer", "bits", "before", "after", "reason"):
        assert column in header
    assert "total:" in out and "budget 4bit" in out
    assert "=====" not in out and "placeholder" not in out
    rows = [line.split() for line in lines[2:] if line.startswith("0 ")]
    assert rows and {"0", "2"} & {r[1] for r in rows}, rows  # nn.Sequential children: module "0", "2", ...
    assert main(["dump", f"{FIXTURE}:make", "--budget", "4bit", "--option", "min_bytes=1024", "--graphs", "--all"]) == 0
    out = capsys.readouterr().out
    assert "===== graph 0: forward =====" in out and "===== graph 0: backward =====" in out
    assert "addmm_codes" in out and "placeholder" in out
    assert out.index("total:") < out.index("===== graph 0: forward")


def test_dump_json(capsys):
    assert main(["dump", f"{FIXTURE}:make", "--format", "json", "--budget", "0.5", "--option", "min_bytes=1024"]) == 0
    data = json.loads(capsys.readouterr().out)
    (graph,) = data["graphs"]
    kinds = {t["name"]: t["kind"] for t in graph["tensors"]}
    assert "mask" in kinds.values()  # the dropout mask, 1 bit
    assert graph["budget"].startswith("0.5")
    assert data["bytes_after"] <= 0.5 * data["bytes_before"]
    assert "forward_code" not in graph  # graphs only with --graphs
    assert all(isinstance(t["shape"], list) and all(isinstance(d, int) for d in t["shape"]) for t in graph["tensors"])
    assert main(["dump", f"{FIXTURE}:make", "--format", "json", "--graphs"]) == 0
    assert "def forward" in json.loads(capsys.readouterr().out)["graphs"][0]["forward_code"]


def test_dump_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert main(["dump", f"{FIXTURE}:make", "--option", "min_bytes=1024", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert f"plot written to {png}" in capsys.readouterr().out


def test_plot_groups_bytes_by_module():
    from actc.plan import GraphPlan, TensorPlan
    from actc.plot import by_module

    def t(module, kind, bits, before, after, activation=True):
        return TensorPlan("n", "(1)", "float32", "op", kind, bits, before, after, module=module, activation=activation)

    plan = GraphPlan(0, "2bit", 0, True, [t("a", "quant", 2, 100, 10), t("a", "mask", 1, 50, 5),
                                          t("b", "skip", None, 8, 8), t("w", "skip", None, 999, 999, False)])
    assert by_module([plan]) == [("a", 150, 15, ["2b", "1b"]), ("b", 8, 8, ["full"])]


def test_dump_bad_target_and_bad_budget(capsys):
    with pytest.raises(SystemExit, match="PATH_OR_MODULE:FACTORY"):
        main(["dump", "nofactory"])
    with pytest.raises(SystemExit, match="has no attribute 'nothere'"):
        main(["dump", f"{FIXTURE}:nothere"])
    assert main(["dump", f"{FIXTURE}:make", "--budget", "3 parsecs"]) == 2
    assert "memory_budget" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "actc.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "dump" in out and "demo" in out
    import actc

    version = subprocess.run([sys.executable, "-m", "actc.cli", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"actc {actc.__version__}"


def test_counting_task_is_determined_after_two_tokens():
    x, y = counting_task(8, 16, 32, torch.Generator().manual_seed(0))
    stride = (x[:, 1] - x[:, 0]) % 32
    assert torch.equal(y[:, 1:], (x[:, 1:] + stride[:, None]) % 32) and bool(((stride >= 1) & (stride <= 4)).all())


@pytest.mark.slow  # two compiles (inductor, actc): a minute or two
def test_demo_prints_progress_then_the_table(capsys):
    assert main(["demo", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    for line in ("inductor: compiled in", "actc 2bit: step 8/8", "saved MiB: activations"):
        assert line in out, out
    row = next(l for l in out.splitlines() if l.startswith("actc 2bit "))
    assert float(row.split()[3]) > 4  # x less than inductor: compression happened
