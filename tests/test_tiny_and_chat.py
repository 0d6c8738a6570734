"""The bundled tiny model with its real tokenizer: loading, chat(), and the reply post-processing."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

import chatglm
from chatglm.modeling_chatglm import SafeScoresProcessor, chat_prompt, full_width_punctuation


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
