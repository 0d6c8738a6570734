"""The bundled tiny model with its real tokenizer: loading, chat(), and the reply post-processing."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch
from transformers import AutoTokenizer

import chatglm
from chatglm import ChatGLMTokenizer
from chatglm import __main__ as chat_cli
from chatglm.modeling_chatglm import SafeScoresProcessor, chat_inputs, chat_prompt, full_width_punctuation


def test_tiny_model_and_tokenizer_agree_on_special_ids():
    model, tok = chatglm.tiny()
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.gmask_token_id, cfg.mask_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.gmask_token_id, tok.mask_token_id, tok.pad_token_id)
    assert cfg.vocab_size >= tok.vocab_size and cfg.num_layers == 2
    assert isinstance(AutoTokenizer.from_pretrained(chatglm.TINY_DIR), chatglm.ChatGLMTokenizer)
    assert chatglm.resolve_model_dir("tiny") == chatglm.TINY_DIR


def test_tokenizer_batch_generation_equals_one_at_a_time():
    model, tok = chatglm.tiny()
    texts = ["发动机水温高，风扇不转。", "刹车异响", "仪表盘ABS灯常亮，制动时方向盘抖动。"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][:, 0].tolist() != [1, 1, 1]  # left padded
    kwargs = dict(max_new_tokens=6, do_sample=False)
    out = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    for row, text in zip(out, texts, strict=True):
        single = tok([text], return_tensors="pt")
        alone = model.generate(**single, **kwargs)[0, single["input_ids"].shape[1] :]
        assert row[: len(alone)].tolist() == alone.tolist()


def test_chat_returns_a_reply_and_extends_history():
    model, tok = chatglm.tiny()
    reply, history = model.chat(tok, "你好", history=[("问题", "回答")], max_length=80, do_sample=False)
    assert isinstance(reply, str) and history[-1] == ("你好", reply) and len(history) == 2


def test_chat_prompt_layout():
    assert chat_prompt("你好", []) == "你好"
    assert chat_prompt("再见", [("你好", "嗨")]) == "[Round 0]\n问：你好\n答：嗨\n[Round 1]\n问：再见\n答："


def test_full_width_punctuation_only_next_to_chinese():
    assert full_width_punctuation(" 好的,谢谢!OK, fine: yes? 是吗?") == "好的，谢谢！OK, fine: yes? 是吗？"


def test_safe_scores_processor_blocks_pieceless_ids_and_repairs_nan_rows():
    _, tok = chatglm.tiny()
    scores = torch.zeros(2, tok.vocab_size + 60)
    scores[0, tok.vocab_size + 5] = 100.0  # the best id has no piece
    scores[1, 7] = float("nan")
    out = SafeScoresProcessor(tok)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out[0].argmax() < tok.vocab_size and torch.isinf(out[0, tok.vocab_size :]).all()
    assert out[1].argmax() == tok.convert_tokens_to_ids("▁") and torch.isfinite(out[1, : tok.vocab_size]).all()


def test_safe_scores_processor_counts_nonfinite_steps_per_row():
    _, tok = chatglm.tiny()
    processor = SafeScoresProcessor(tok)
    for bad_row in (1, 1, 2):
        scores = torch.zeros(3, tok.vocab_size)
        scores[bad_row, 4] = float("inf")
        processor(torch.zeros(3, 1, dtype=torch.long), scores)
    assert processor.nonfinite_steps.tolist() == [0, 2, 1]
    processor.reset()
    assert processor.nonfinite_steps is None


def test_chat_cli_keeps_going_when_history_outgrows_max_length(monkeypatch, capsys):
    """`python -m chatglm --model_dir tiny 你好 发动机 --do_sample`: the tiny model's first reply fills max_length,
    so the second turn's prompt alone was longer than max_length and generate() refused it."""
    torch.manual_seed(0)
    monkeypatch.setattr(sys, "argv", ["chatglm", "--model_dir", "tiny", "你好", "发动机", "--do_sample",
                                      "--max_length", "64"])
    chat_cli.main()
    out = capsys.readouterr().out
    assert out.count("问：") == 2 and "问：发动机" in out


def test_chat_leaves_out_oldest_turns_that_do_not_fit_and_refuses_an_oversized_query():
    model, tok = chatglm.tiny()
    history = [("问题一", "发动机" * 30), ("问题二", "回答")]
    # whole: 114 tokens; without the first turn: 57; max_length 96 leaves room for 24 new tokens after 72
    inputs = chat_inputs(tok, "你好", history, max_length=96)
    assert inputs["input_ids"].shape[1] == 57
    assert tok.decode(inputs["input_ids"][0]).count("[Round") == 2  # the long first turn is out, the second in
    reply, new_history = model.chat(tok, "你好", history, max_length=96, do_sample=False)
    assert new_history == history + [("你好", reply)]  # the caller's history is kept whole
    with pytest.raises(ValueError, match="the query alone is .* tokens, max_length=16"):
        model.chat(tok, "发动机水温高，风扇不转。" * 4, [], max_length=16)


def test_model_directory_without_ice_text_model_says_so(tmp_path):
    shutil.copy(chatglm.TINY_DIR / "config.json", tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"no ice_text.model in {tmp_path}")):
        ChatGLMTokenizer.from_pretrained(tmp_path)
