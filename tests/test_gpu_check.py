"""bench/gpu_check.py (the one-command GPU check) keeps working where no GPU is at hand: without CUDA it refuses at
once with exit code 2, and its --cpu-smoke mode runs every group's code on the CPU with tiny sizes. Also: every
command-line parser in the repository refuses abbreviations (issue 10, defect 15)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


def run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2_at_once():
    start = time.perf_counter()
    done = run()
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "check " not in done.stdout
    assert time.perf_counter() - start < 60  # imports only: nothing is built or trained


def test_help_and_unknown_groups():
    assert run("--help").returncode == 0
    done = run("--only", "logits,speed")
    assert done.returncode == 2 and "unknown groups ['speed']" in done.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_group_and_prints_one_table(tmp_path):
    done = run("--cpu-smoke", "--work_dir", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("check "):]
    for row in ("logits float16", "logits bfloat16", "train 2 + predict lora", "INT8 linear", "INT4 linear",
                "memory lora step", "greedy generation, batch 8"):
        line = next(line for line in table.splitlines() if line.startswith(row))
        assert " ok " in line, line
    assert "0 failed" in done.stdout
    assert (tmp_path / "lora" / "predict" / "metrics.json").is_file()


def test_every_command_line_parser_refuses_abbreviations():
    """argparse's prefix matching turns a misspelt --learning_rat into --learning_rate: every parser built in the
    repository must pass allow_abbrev=False."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if {"build", ".venv"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == (
                    "ArgumentParser"):
                flags = {k.arg: k.value for k in node.keywords}
                if not (isinstance(flags.get("allow_abbrev"), ast.Constant) and flags["allow_abbrev"].value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
