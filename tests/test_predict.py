"""Prediction from checkpoints: settings restored from meta.json, batched == one at a time, merged == unmerged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import chatglm
from chatglm.modeling_chatglm import SafeScoresProcessor
from glmft import checkpoint, predict
from glmft.args import TrainArgs
from glmft.data import read_records, record_prompt_ids
from glmft.train import meta_record
from glmft.tuners import TUNERS

METHOD_ARGS = {"freeze": {"num_trainable_layers": 1}, "embedding": {}, "pt": {"pre_seq_len": 3},
               "lora": {"lora_r": 4}}
TEST = ROOT / "data" / "sample_test.jsonl"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny model made to produce varied text: an untied random output layer and louder attention (the tied
    random model just repeats its last input token), saved with the tokenizer as a base-model directory."""
    model, tok = chatglm.tiny()
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.transformer.layers:
            layer.attention.query_key_value.weight.mul_(10.0)
            layer.attention.dense.weight.mul_(30.0)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(64, model.config.vocab_size, bias=False)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_checkpoint(method: str, base_dir, directory):
    """A checkpoint as a 2-step training run leaves it (weights moved off their initial values, real meta.json)."""
    tuner = TUNERS[method]
    args = tuner.Args(**METHOD_ARGS[method])
    overrides = tuner.model_overrides(args) if hasattr(tuner, "model_overrides") else {}
    torch.manual_seed(0)
    model = tuner.apply(chatglm.ChatGLMForConditionalGeneration.from_pretrained(base_dir, **overrides), args)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    train = TrainArgs(model_dir=str(base_dir), max_len=200, max_src_len=150)
    checkpoint.save(model, directory, meta_record(train, args, tuner, overrides, step=2, epoch=0), tuner)
    return model.eval(), tuner


def one_at_a_time(model, tok, records, max_src_len, max_new_tokens):
    texts = []
    for record in records:
        ids = torch.tensor([record_prompt_ids(record, tok, max_src_len)])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, logits_processor=[SafeScoresProcessor(tok)])
        out = out[0, ids.shape[1] :].tolist()
        out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        texts.append(tok.decode(out, skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("method", list(TUNERS))
def test_predict_batch_8_equals_in_memory_model_one_at_a_time(method, base_dir, tmp_path):
    model, tuner = make_checkpoint(method, base_dir, tmp_path / "ckpt")
    args = predict.PredictArgs(test_path=str(TEST), ckpt_dir=str(tmp_path / "ckpt"), batch_size=8, max_new_tokens=6)
    result = predict.run(args, tuner)  # lora: merged by default, compared with the unmerged in-memory model
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "predict" / "predictions.jsonl").open()]
    tok = chatglm.ChatGLMTokenizer.from_pretrained(base_dir)
    expected = one_at_a_time(model, tok, read_records(TEST), 150, 6)
    assert [r["generated"] for r in rows] == expected
    assert len(set(expected)) > 1  # the outputs really differ between records
    assert result["n_records"] == 12 and result["records_per_s"] > 0
    assert {"sample_f1", "micro_f1", "micro_f1_ci95", "parse_failures", "test_seconds"} <= result.keys()


def test_pt_checkpoint_restores_prefix_settings(base_dir, tmp_path):
    make_checkpoint("pt", base_dir, tmp_path / "ckpt")
    meta = checkpoint.read_meta(tmp_path / "ckpt")
    assert meta["model_overrides"] == {"pre_seq_len": 3, "prefix_projection": False}
    args = predict.PredictArgs(ckpt_dir=str(tmp_path / "ckpt"))
    model, *_ = predict.load(args, TUNERS["pt"], torch.device("cpu"))
    assert model.config.pre_seq_len == 3 and not model.config.prefix_projection and not model.training


def test_output_dir_holding_checkpoints_resolves_to_the_latest(base_dir, tmp_path):
    make_checkpoint("embedding", base_dir, tmp_path / "run" / "checkpoint-2")
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-10")
    (tmp_path / "run" / ".checkpoint-12.partial").mkdir()  # a killed save is never picked
    assert predict.resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-10"


def test_checkpoint_of_another_method_is_refused(base_dir, tmp_path):
    make_checkpoint("lora", base_dir, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="'lora' checkpoint; use predict_lora.py"):
        predict.load(predict.PredictArgs(ckpt_dir=str(tmp_path / "ckpt")), TUNERS["freeze"], torch.device("cpu"))


def test_predict_script_end_to_end_is_deterministic(base_dir, tmp_path):
    make_checkpoint("lora", base_dir, tmp_path / "ckpt")
    outputs = []
    for run in ("a", "b"):
        cmd = [sys.executable, str(ROOT / "predict_lora.py"), "--ckpt_dir", str(tmp_path / "ckpt"), "--test_path",
               str(TEST), "--max_new_tokens", "5", "--output_dir", str(tmp_path / run), "--no-merge"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "micro P / R / F1" in done.stdout and "records/s" in done.stdout
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert metrics["settings"]["merge"] is False and metrics["method"] == "lora"
        outputs.append((tmp_path / run / "predictions.jsonl").read_text())
    assert outputs[0] == outputs[1]
