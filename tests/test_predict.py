"""Prediction from checkpoints: settings restored from meta.json, batched == one at a time, merged == unmerged."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, small_args
from safetensors.torch import load_file, save_file

import chatglm
from chatglm.modeling_chatglm import SafeScoresProcessor
from glmft import checkpoint, predict, retention
from glmft.args import TrainArgs
from glmft.data import read_records, record_prompt_ids
from glmft.train import meta_record
from glmft.tuners import TUNERS

TEST = ROOT / "data" / "sample_test.jsonl"


def make_checkpoint(method: str, base_dir, directory):
    """A checkpoint as a 2-step training run leaves it (weights moved off their initial values, real meta.json)."""
    tuner = TUNERS[method]
    args = small_args(tuner)
    overrides = tuner.model_overrides(args)
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


# ----------------------------------------------------------------------------------------------------------------
# Precision: meta.json records the training dtype; predict uses it on CUDA unless --dtype says otherwise
# ----------------------------------------------------------------------------------------------------------------
def test_meta_json_records_the_training_dtype():
    from types import SimpleNamespace

    from glmft.train import engine_dtype

    tuner = TUNERS["embedding"]
    args = tuner.Args()
    train = TrainArgs(max_len=200, max_src_len=150)
    assert meta_record(train, args, tuner, {}, 2, 0)["dtype"] == "float32"
    for fp16, bf16, name in ((True, False, "float16"), (False, True, "bfloat16"), (False, False, "float32")):
        engine = SimpleNamespace(fp16_enabled=lambda v=fp16: v, bfloat16_enabled=lambda v=bf16: v)
        assert engine_dtype(engine) == name
        assert meta_record(train, args, tuner, {}, 2, 0, dtype=engine_dtype(engine))["dtype"] == name


def test_predict_dtype_follows_meta_on_cuda_fp32_on_cpu_and_dtype_overrides(monkeypatch, tmp_path):
    cuda, cpu, ckpt = torch.device("cuda"), torch.device("cpu"), tmp_path
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert predict.predict_dtype("auto", {"dtype": "bfloat16"}, ckpt, cuda) == torch.bfloat16
    assert predict.predict_dtype("auto", {"dtype": "float32"}, ckpt, cuda) == torch.float32
    assert predict.predict_dtype("auto", {}, ckpt, cuda) == torch.float16  # written before meta.json had it
    assert predict.predict_dtype("auto", {"dtype": "bfloat16"}, ckpt, cpu) == torch.float32
    assert predict.predict_dtype("bf16", {"dtype": "float16"}, ckpt, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match=r"meta\.json: dtype 'half16'"):
        predict.predict_dtype("auto", {"dtype": "half16"}, ckpt, cuda)
    with pytest.raises(ValueError, match="--dtype must be auto, fp32, fp16, bf16"):
        predict.PredictArgs(ckpt_dir="x", dtype="float64")


def test_predict_runs_in_the_dtype_asked_for(base_dir, tmp_path):
    make_checkpoint("lora", base_dir, tmp_path / "ckpt")
    result = predict.run(predict.PredictArgs(test_path=str(TEST), ckpt_dir=str(tmp_path / "ckpt"), limit=2,
                                             max_new_tokens=2, dtype="bf16"), TUNERS["lora"])
    assert result["dtype"] == "bfloat16" and result["settings"]["dtype"] == "bf16"


@pytest.mark.gpu
def test_predict_on_cuda_uses_the_dtype_recorded_in_meta_json(base_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    make_checkpoint("lora", base_dir, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({**meta, "dtype": "bfloat16"}))
    args = predict.PredictArgs(test_path=str(TEST), ckpt_dir=str(tmp_path / "ckpt"), limit=2, max_new_tokens=2)
    assert predict.run(args, TUNERS["lora"])["dtype"] == "bfloat16"
    args.dtype = "fp32"
    assert predict.run(args, TUNERS["lora"])["dtype"] == "float32"


# ----------------------------------------------------------------------------------------------------------------
# Non-finite logits are counted and reported, not hidden
# ----------------------------------------------------------------------------------------------------------------
def test_nonfinite_logits_are_counted_in_metrics_and_warned_about(base_dir, tmp_path, capsys):
    make_checkpoint("embedding", base_dir, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / checkpoint.WEIGHTS_FILE
    state = load_file(weights)
    state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}  # a diverged run's embedding
    save_file(state, weights, metadata={"format": "pt"})
    args = predict.PredictArgs(test_path=str(TEST), ckpt_dir=str(tmp_path / "ckpt"), limit=3, max_new_tokens=2,
                               batch_size=2)
    result = predict.run(args, TUNERS["embedding"])
    assert result["nonfinite_logits"] == {"records": 3, "positions": 6}  # every generated position of every record
    saved = json.loads((tmp_path / "ckpt" / "predict" / "metrics.json").read_text())
    assert saved["nonfinite_logits"] == {"records": 3, "positions": 6}
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "predict" / "predictions.jsonl").open()]
    assert [r["nonfinite_positions"] for r in rows] == [2, 2, 2]
    assert "WARNING: NaN/inf logits at 6 generated positions in 3 of 3 records" in capsys.readouterr().out


def test_finite_run_reports_zero_nonfinite(base_dir, tmp_path, capsys):
    make_checkpoint("pt", base_dir, tmp_path / "ckpt")
    args = predict.PredictArgs(test_path=str(TEST), ckpt_dir=str(tmp_path / "ckpt"), limit=2, max_new_tokens=2,
                               num_beams=2)
    assert predict.run(args, TUNERS["pt"])["nonfinite_logits"] == {"records": 0, "positions": 0}
    assert "WARNING" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# meta.json problems name the file and the field
# ----------------------------------------------------------------------------------------------------------------
def test_missing_base_model_recorded_in_meta_json_says_so(base_dir, tmp_path):
    moved = tmp_path / "base"
    shutil.copytree(base_dir, moved)
    make_checkpoint("embedding", moved, tmp_path / "ckpt")
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError) as err:
        predict.load(predict.PredictArgs(ckpt_dir=str(tmp_path / "ckpt")), TUNERS["embedding"], torch.device("cpu"))
    message = str(err.value)
    assert str(tmp_path / "ckpt" / "meta.json") in message and str(moved.resolve()) in message
    assert "is missing" in message and "pass --model_dir" in message and not message.startswith("--model_dir")
    args = predict.PredictArgs(ckpt_dir=str(tmp_path / "ckpt"), model_dir=str(base_dir))
    assert predict.load(args, TUNERS["embedding"], torch.device("cpu"))[0] is not None  # --model_dir repairs it


@pytest.mark.parametrize("field", ["data", "data.max_src_len", "method_args"])
def test_meta_json_without_a_field_names_file_and_field(base_dir, tmp_path, field):
    make_checkpoint("embedding", base_dir, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(path.read_text())
    del (meta["data"] if field.startswith("data.") else meta)[field.removeprefix("data.")]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{path}: no {field}")):
        predict.run(predict.PredictArgs(ckpt_dir=str(tmp_path / "ckpt"), test_path=str(TEST)), TUNERS["embedding"])


# ----------------------------------------------------------------------------------------------------------------
# Forgetting (--retention_path): the checkpoint against its base model built alone; the base model alone is 0
# ----------------------------------------------------------------------------------------------------------------
def test_retention_measures_the_checkpoint_against_its_base_model_alone(base_dir, tmp_path, monkeypatch, capsys):
    make_checkpoint("pt", base_dir, tmp_path / "ckpt")
    built, real = [], predict.build_model

    def build(path, dtype=torch.float32, overrides=None, **kw):
        built.append(dict(overrides or {}))
        return real(path, dtype, overrides, **kw)

    monkeypatch.setattr(predict, "build_model", build)
    args = predict.PredictArgs(test_path=str(TEST), ckpt_dir=str(tmp_path / "ckpt"), limit=2, max_new_tokens=2,
                               retention_path="data/retention.jsonl", retention_max_new_tokens=6)
    result = predict.run(args, TUNERS["pt"])
    out = tmp_path / "ckpt" / "predict"
    block = json.loads((out / "metrics.json").read_text())["retention"]
    assert block == result["retention"] and block["prompts"] == 12 and "per_prompt" not in block
    assert all(math.isfinite(block[k]) for k in ("nll_base", "nll_tuned", "nll_delta"))
    assert block["nll_delta"] == pytest.approx(block["nll_tuned"] - block["nll_base"]) and block["nll_delta"] != 0
    assert 0 <= block["changed_rate"] <= 1
    # the reference came from the base model without the method's prefix encoder, built before the tuned model
    assert built == [{}, {"pre_seq_len": 3, "prefix_projection": False}]
    assert predict.base_overrides({"model_overrides": {"pre_seq_len": 3, "quantization_bit": 4}}) == {
        "quantization_bit": 4}  # a quantized run's base is quantized alike
    tok = chatglm.ChatGLMTokenizer.from_pretrained(base_dir)
    ref = retention.reference(real(base_dir).eval(), tok, retention.load_prompts(), max_new_tokens=6)
    assert block["nll_base"] == pytest.approx(sum(ref.nll) / sum(map(len, ref.answers)), rel=1e-5)
    rows = [json.loads(line) for line in (out / "retention.jsonl").open()]
    assert len(rows) == 12 and {"prompt", "base", "tuned", "nll_base", "nll_tuned", "changed"} <= rows[0].keys()
    assert block["changed_rate"] == sum(r["changed"] for r in rows) / 12
    assert "retention on 12 general prompts" in capsys.readouterr().out
    args.retention_path = ""  # measured no more: no block, and no earlier run's rows left to pass for this run's
    assert "retention" not in predict.run(args, TUNERS["pt"]) and not (out / "retention.jsonl").exists()


def test_the_untuned_base_model_has_zero_forgetting_without_computing_it(base_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("computed")

    monkeypatch.setattr(retention, "reference", refuse)
    monkeypatch.setattr(retention, "measure", refuse)
    args = predict.PredictArgs(model_dir=str(base_dir), test_path=str(TEST), limit=1, max_new_tokens=1,
                               output_dir=str(tmp_path), retention_path="data/retention.jsonl")
    block = predict.run(args)["retention"]
    assert block["nll_delta"] == 0 and block["changed_rate"] == 0 and block["untuned"] and block["prompts"] == 12
    assert json.loads((tmp_path / "metrics.json").read_text())["retention"] == block
    assert not (tmp_path / "retention.jsonl").exists()
