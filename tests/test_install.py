"""The project outside its root (issue 10, defect 17): installable with ``pip install -e .``, and the shipped defaults
(data samples, DeepSpeed configs) found from any working directory."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

from glmft import predict, shipped
from glmft.args import TrainArgs


def test_shipped_defaults_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped.resolve("ds_config.json") == str(ROOT / "ds_config.json")
    assert shipped.resolve("data/sample_train.jsonl") == str(ROOT / "data" / "sample_train.jsonl")
    train = TrainArgs()
    assert Path(train.train_path).is_file() and Path(train.deepspeed_config).is_file()
    assert Path(predict.PredictArgs(ckpt_dir="x").test_path).is_file()
    # what is not shipped, or not there, is left alone so that its error names it as given
    assert shipped.resolve("my_data/train.jsonl") == "my_data/train.jsonl"
    assert shipped.resolve("ds_nothing.json") == "ds_nothing.json"


def test_a_file_in_the_working_directory_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_config.json").write_text("{}")
    assert shipped.resolve("ds_config.json") == "ds_config.json"
    assert TrainArgs().deepspeed_config == "ds_config.json"
    absolute = str(tmp_path / "elsewhere.jsonl")
    assert shipped.resolve(absolute) == absolute


def test_every_ds_config_is_shipped_by_name():
    for path in ROOT.glob("ds_*.json"):
        assert shipped.is_shipped(path.name), path.name


def test_pyproject_builds_both_packages_with_the_tiny_model_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["chatglm*", "glmft*"]
    patterns = project["tool"]["setuptools"]["package-data"]["chatglm.tiny"]
    data_files = [p for p in (ROOT / "chatglm" / "tiny").iterdir() if p.is_file() and p.suffix != ".py"]
    assert data_files and all(any(p.match(pattern) for pattern in patterns) for p in data_files)
    shared = [f for files in project["tool"]["setuptools"]["data-files"].values() for f in files]
    for path in ("ds_config.json", "data/sample_train.jsonl", "data/sample_test.jsonl"):
        assert any(Path(path).match(pattern) for pattern in shared), path


def test_installed_packages_import_from_another_directory(tmp_path):
    try:
        importlib.metadata.distribution("chatglm-finetuning")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("not installed: run `pip install -e .` (the README's set-up line does)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import chatglm, glmft.train, json; print(json.dumps([chatglm.__file__, str(chatglm.TINY_DIR)]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    module, tiny = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(module).is_file() and (Path(tiny) / "model.safetensors").is_file()


@pytest.mark.slow
def test_training_script_runs_from_another_directory(tmp_path):
    """`cd /tmp && python /path/to/finetuning_lora.py`: the default data and ds_config.json are the shipped ones."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / "finetuning_lora.py"), "--model_dir", "tiny", "--max_steps", "2",
           "--max_len", "128", "--max_src_len", "64", "--output_dir", "out"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    meta = json.loads((tmp_path / "out" / "checkpoint-2" / "meta.json").read_text())
    assert meta["data"]["train_path"] == str(ROOT / "data" / "sample_train.jsonl")
