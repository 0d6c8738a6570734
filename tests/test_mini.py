"""The pretrained mini model: its shape and files, and that methods learn on it through the real scripts.

Two learning tests, each training ``freeze`` (all 4 layers) and ``lora`` (r 8 on all four matrices) through the
real scripts, the two runs side by side (two cores, one thread each):

- the answer form, anywhere (the project's own data): 150 steps on ``data/sample_train.jsonl``, scored on
  ``data/sample_test.jsonl`` (in neither the training file nor mini's pretraining corpus). A working method halves
  its loss and writes ``subject_relation_object`` lines with a known relation; about a minute and a half.
- extraction, where ``../shared`` is beside the checkout (CI has it): 500 steps on the real triples data (spo_0),
  scored on all 50 held-out records of spo_1 (never in the pretraining corpus). Measured micro-F1: freeze 0.068,
  lora 0.033; a wrongly wired method scores 0.000 (a tuner that trains only the final layernorm, and labels shifted
  by one position, both run against this file: issue 11's note). About six minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path

import chatglm
from chatglm import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from chatglm.mini import build, corpus

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "chatglm" / "mini"
TIMEOUT = 1200  # a hang guard: the extraction runs take about 5.5 min here
SHARED = ["--model_dir", "mini", "--train_path", "data/sample_train.jsonl", "--max_len", "128", "--max_src_len", "96",
          "--train_batch_size", "8", "--log_steps", "5"]
METHODS = {
    "freeze": ["--num_trainable_layers", "4", "--learning_rate", "2e-3", "--max_steps", "150"],
    "lora": ["--lora_r", "8", "--lora_target", "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
             "--learning_rate", "5e-3", "--max_steps", "150"],
}
SPO = ["--model_dir", "mini", "--max_len", "320", "--max_src_len", "224", "--train_batch_size", "8",
       "--log_steps", "20", "--max_steps", "500"]
SPO_METHODS = {"freeze": ["--num_trainable_layers", "4", "--learning_rate", "2e-3"],
               "lora": ["--lora_r", "8", "--lora_target", "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
                        "--learning_rate", "5e-3"]}
# Half of what each reached (0.068, 0.033: a handful of exact triples); a wrongly wired method finds none: 0.000.
F1_MIN = {"freeze": 0.034, "lora": 0.016}
FORM_MIN = 0.4  # share of answer lines that are well-formed triples with a known relation (measured 0.85+)
RELATIONS = {"部件故障", "性能故障", "组成", "检测工具"}

needs_mini = pytest.mark.skipif(not (MINI / "model.safetensors").is_file(),
                                reason="chatglm/mini/model.safetensors is absent (python -m chatglm.mini.build)")


@needs_mini
def test_mini_is_a_v1_chatglm_with_its_own_tokenizer():
    assert chatglm.resolve_model_dir("mini") == MINI
    tok = ChatGLMTokenizer.from_pretrained(chatglm.resolve_model_dir("mini"))
    model = ChatGLMForConditionalGeneration.from_pretrained(MINI).eval()
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.gmask_token_id, cfg.mask_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.gmask_token_id, tok.mask_token_id, tok.pad_token_id)
    assert cfg.position_encoding_2d and tok.vocab_size <= cfg.vocab_size
    assert 4_000_000 <= model.num_parameters() <= 8_000_000
    assert (MINI / "model.safetensors").stat().st_size < 20 * 2**20
    text = "故障现象：发动机水温高，风扇不转。\n 龘"  # a newline, a space and a character only byte pieces spell
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@needs_mini
def test_mini_loads_with_a_prefix_encoder_and_quantized():
    ids = ChatGLMTokenizer.from_pretrained(MINI)(["发动机水温高"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = ChatGLMForConditionalGeneration.from_pretrained(MINI).eval()(ids).logits
        for bits in (8, 4):
            quantized = ChatGLMForConditionalGeneration.from_pretrained(MINI, quantization_bit=bits).eval()(ids).logits
            assert torch.isfinite(quantized).all() and (quantized.argmax(-1) == full.argmax(-1)).float().mean() > 0.5
        prefixed = ChatGLMForConditionalGeneration.from_pretrained(MINI, pre_seq_len=4, prefix_projection=True)
        assert prefixed.eval()(ids).logits.shape == full.shape


def test_build_without_the_shared_data_says_where_it_should_be(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spo/spo_0\.json.*not there"):
        corpus.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build.main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "0"}


def _launch(argvs: dict[str, list[str]], workdir: Path) -> dict[str, str]:
    """Start every command at once (two cores, one thread each); the output of each, failing on a non-zero exit."""
    procs = {}
    for name, argv in argvs.items():
        log = (workdir / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_env(), stdout=log,
                                        stderr=subprocess.STDOUT), workdir / f"{name}.log")
    out = {}
    for name, (proc, log) in procs.items():
        rc = proc.wait(timeout=TIMEOUT)
        out[name] = log.read_text()
        assert rc == 0, f"{name} exited {rc}:\n{out[name][-3000:]}"
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    if not (MINI / "model.safetensors").is_file():
        pytest.skip("chatglm/mini/model.safetensors is absent: build it with python -m chatglm.mini.build")
    work = tmp_path_factory.mktemp("mini")
    _launch({m: [f"finetuning_{m}.py", *SHARED, *opts, "--output_dir", str(work / m)] for m, opts in METHODS.items()},
            work)
    _launch({f"predict_{m}": [f"predict_{m}.py", "--ckpt_dir", str(work / m), "--test_path", "data/sample_test.jsonl",
                              "--output_dir", str(work / m / "scored")] for m in METHODS}, work)
    return {m: {"metrics": json.loads((work / m / "scored" / "metrics.json").read_text()),
                "well_formed": _well_formed_share(work / m / "scored" / "predictions.jsonl"),
                "summary": json.loads((work / m / "train_summary.json").read_text())} for m in METHODS}


def _well_formed_share(predictions: Path) -> float:
    """Share of generated answer lines that are ``subject_relation_object`` with one of the four relations."""
    lines = [line.strip() for row in predictions.read_text().splitlines()
             for line in json.loads(row)["generated"].split("\n") if line.strip()]
    good = [line for line in lines if len(parts := line.split("_")) == 3 and all(parts) and parts[1] in RELATIONS]
    return len(good) / max(1, len(lines))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_mini_learns_the_answer_form(results, method):
    """Loss halves and the answers become triples: a tuner that trains nothing keeps the loss and writes corpus
    text; labels shifted by one teach the model to repeat its input and it writes no triple."""
    losses = [point["train/loss"] for point in results[method]["summary"]["history"]]
    assert losses[-1] <= 0.5 * losses[0], f"{method}: loss {losses[0]:.3f} -> {losses[-1]:.3f} did not halve"
    share = results[method]["well_formed"]
    assert share >= FORM_MIN, f"{method}: only {share:.0%} of the generated lines are well-formed triples"


@pytest.fixture(scope="module")
def extraction(tmp_path_factory) -> dict[str, dict]:
    """freeze and lora trained on spo_0 and scored on spo_1 (the metrics of each)."""
    if not (MINI / "model.safetensors").is_file():
        pytest.skip("chatglm/mini/model.safetensors is absent: build it with python -m chatglm.mini.build")
    train, test = shared_path("data", "spo", "spo_0.json"), shared_path("data", "spo", "spo_1.json")
    work = tmp_path_factory.mktemp("mini_spo")
    _launch({m: [f"finetuning_{m}.py", *SPO, *opts, "--train_path", str(train), "--output_dir", str(work / m)]
             for m, opts in SPO_METHODS.items()}, work)
    _launch({f"predict_{m}": [f"predict_{m}.py", "--ckpt_dir", str(work / m), "--test_path", str(test),
                              "--output_dir", str(work / m / "scored")] for m in SPO_METHODS}, work)
    return {m: json.loads((work / m / "scored" / "metrics.json").read_text()) for m in SPO_METHODS}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SPO_METHODS))
def test_mini_learns_to_extract(extraction, method):
    """Exact triples on held-out texts: spans copied from the text, in the right order, with the right relation."""
    metrics = extraction[method]
    assert metrics["n_records"] == 50
    f1 = metrics["micro_f1"]
    assert f1 >= F1_MIN[method], (f"{method}: held-out micro-F1 {f1:.3f} < {F1_MIN[method]} (what a wrongly wired "
                                  "method scores: 0)")
