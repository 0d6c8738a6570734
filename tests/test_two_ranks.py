"""(slow) The methods beyond the seeds' four, each once through ``deepspeed --num_gpus 2 finetune.py --method NAME``
on two CPU ranks under ZeRO-2: the run finishes, saves once, its tensors moved, and ``predict.py`` scores it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_scripts import SMALL, deepspeed_launcher, four_records, free_port
from test_zero import Limited

from glmft import checkpoint, data
from glmft.model import build_model, load_tokenizer
from glmft.predict import PredictArgs
from glmft.predict import run as predict
from glmft.tuners import TUNERS

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
OPTIONS = {"bitfit": ["--learning_rate", "1e-2"], "ia3": [], "adapter": ["--adapter_size", "8"],
           "full": ["--learning_rate", "1e-3"], "prompt_tuning": ["--num_virtual_tokens", "4"],
           "p_tuning": ["--num_virtual_tokens", "4", "--encoder_type", "lstm"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("two_ranks")
    data = four_records(work)
    pool = Limited(work, width=2)
    for method, options in OPTIONS.items():
        pool.start(method, [*deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()),
                            "finetune.py", "--method", method, *SMALL, "--train_path", str(data),
                            "--train_batch_size", "1", "--max_steps", str(STEPS), "--deepspeed_config",
                            str(ROOT / "ds_zero2.json"), *options, "--output_dir", str(work / method)])
    yield work, pool
    pool.close()


@pytest.mark.slow
@pytest.mark.parametrize("method", OPTIONS)
def test_two_ranks_under_zero2_train_save_and_predict(runs, method):
    work, pool = runs
    done = pool.result(method)
    assert done.rc == 0, done.tail()
    assert "world 2" in done.output
    ckpt = work / method / f"checkpoint-{STEPS}"
    meta = checkpoint.read_meta(ckpt)
    assert meta["method"] == method and meta["training"] == {**meta["training"], "world_size": 2, "zero_stage": 2}
    tuner = TUNERS[method]

    def fresh():
        torch.manual_seed(0)
        return tuner.apply(build_model("tiny"), tuner.Args(**meta["method_args"])).eval()

    loaded = fresh()
    checkpoint.load_weights(loaded, ckpt, tuner)
    ids = torch.tensor([data.build_prompt_ids("小明的父亲是谁？", load_tokenizer("tiny"), 64, prompt_text="")])
    with torch.no_grad():
        assert not torch.equal(loaded(input_ids=ids).logits, fresh()(input_ids=ids).logits)  # the run trained
    metrics = predict(PredictArgs(ckpt_dir=str(ckpt), test_path=str(work / "four.jsonl"), max_new_tokens=4,
                                  output_dir=str(work / f"{method}_predict")))
    assert metrics["method"] == method and metrics["n_records"] == 4
