"""`actc dump` on a fixture file, in text and json, and its errors."""
import json
import os
import subprocess
import sys

import pytest

from actc.cli import main

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_model.py")


def test_dump_text(capsys):
    assert main(["dump", f"{FIXTURE}:make", "--budget", "4bit", "--option", "min_bytes=1024"]) == 0
    out = capsys.readouterr().out
    assert "===== graph 0: forward =====" in out and "===== graph 0: backward =====" in out
    assert "addmm_codes" in out  # the rewritten graphs are printed
    header = next(line for line in out.splitlines() if line.startswith("graph"))
    for column in ("name", "shape", "dtype", "producer", "bits", "before", "after", "reason"):
        assert column in header
    assert "total:" in out and "budget 4bit" in out


def test_dump_json(capsys):
    assert main(["dump", f"{FIXTURE}:make", "--format", "json", "--budget", "0.5", "--option", "min_bytes=1024"]) == 0
    data = json.loads(capsys.readouterr().out)
    (graph,) = data["graphs"]
    kinds = {t["name"]: t["kind"] for t in graph["tensors"]}
    assert "mask" in kinds.values()  # the dropout mask, 1 bit
    assert graph["budget"].startswith("0.5")
    assert data["bytes_after"] <= 0.5 * data["bytes_before"]
    assert "def forward" in graph["forward_code"]


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
