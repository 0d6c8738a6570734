"""Tiny models of every family, built from config in a directory as their checkpoints are laid out: ChatGLM2 and
ChatGLM3 (official tensor names, chatglm/tiny2's tokenizer) and transformers' bloom, llama and qwen2 (a byte-level
BPE tokenizer trained here on data/sample_train.jsonl; qwen2's with a chat template, to cover that layout)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BloomConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

import chatglm
from chatglm import ChatGLM2Config, ChatGLM2ForCausalLM, ChatGLM2Tokenizer, ChatGLM3Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY2 = ROOT / "chatglm" / "tiny2"
FAMILY_OF = {"chatglm2": "chatglm2", "chatglm3": "chatglm2", "bloom": "causal_lm", "llama": "causal_lm",
             "qwen2": "causal_lm"}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chatglm2_dir(directory: Path, version: int = 2, seed: int = 0) -> Path:
    """A 2-layer ChatGLM2 (or 3) with random weights, saved under the official names, with the tiny tokenizer."""
    torch.manual_seed(seed)
    config = ChatGLM2Config(padded_vocab_size=1024, hidden_size=64, num_layers=2, num_attention_heads=4,
                            kv_channels=16, multi_query_group_num=2, ffn_hidden_size=128, seq_length=512)
    ChatGLM2ForCausalLM(config).save_pretrained(directory)
    (ChatGLM3Tokenizer if version == 3 else ChatGLM2Tokenizer).from_pretrained(TINY2).save_pretrained(directory)
    return directory


def bpe_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "sample_train.jsonl").open(encoding="utf-8")]
    texts += [json.loads(line)["answer"] for line in (ROOT / "data" / "sample_train.jsonl").open(encoding="utf-8")]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def causal_dir(directory: Path, kind: str, seed: int = 0) -> Path:
    """A 2-layer bloom, llama or qwen2 with random weights and the BPE tokenizer."""
    tokenizer = bpe_tokenizer(CHAT_TEMPLATE if kind == "qwen2" else None)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if kind == "bloom":
        config = BloomConfig(hidden_size=64, n_layer=2, n_head=4, **ids)
    else:
        cls = LlamaConfig if kind == "llama" else Qwen2Config
        config = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build(root: Path, kind: str) -> Path:
    directory = Path(root) / kind
    directory.mkdir(parents=True, exist_ok=True)
    if kind in ("chatglm2", "chatglm3"):
        return chatglm2_dir(directory, int(kind[-1]))
    return causal_dir(directory, kind)


__all__ = ["FAMILY_OF", "build", "chatglm"]
