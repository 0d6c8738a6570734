"""finetune.py --method NAME: the generic entry point beside the seed-named scripts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, shared_path

from glmft import args
from glmft.tuners import TUNERS


def test_the_method_is_taken_out_and_the_rest_goes_to_its_parser():
    method, rest = args.parse_method(["--model_dir", "tiny", "--method=lora", "--lora_r", "4"], list(TUNERS))
    assert method == "lora" and rest == ["--model_dir", "tiny", "--lora_r", "4"]
    train, lora = args.parse(TUNERS[method], rest)
    assert lora.lora_r == 4 and train.output_dir == "output/lora"


@pytest.mark.parametrize("argv", [["--model_dir", "tiny"], ["--method", "nope"]])
def test_a_missing_or_unknown_method_exits_with_usage_naming_the_methods(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        args.parse_method(argv, list(TUNERS))
    assert exit_info.value.code == 2
    assert list(TUNERS)[:4] == ["freeze", "embedding", "pt", "lora"]  # the seeds' four first
    assert "{" + ",".join(TUNERS) + "}" in capsys.readouterr().err.replace("\n", "")


def test_dry_run_prints_the_peft_line_the_seed_table_has_for_bloom():
    config = shared_path("fixtures", "configs", "bloom-1b4-zh", "config.json")
    done = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--method", "bitfit", "--dry_run",
                           "--model_dir", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    # the configs README's seed row for BitFit on bloom-1b4-zh
    assert "trainable params: 544,768 || all params: 1,303,111,680 || trainable%: 0.0418" in done.stdout
