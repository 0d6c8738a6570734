"""ChatGLM2-6B and ChatGLM3-6B: one network (``chatglm/chatglm2``, on transformers' GlmForCausalLM), two tokenizers
and prompt formats. The example layout is what the model sees at inference, followed by the answer and ``</s>``:

* ChatGLM2 (THUDM's ``ptuning/main.py`` for ChatGLM2): ``[gMASK] sop`` + ``[Round 1]\\n\\n问：{source}\\n\\n答：``,
  then the answer and ``</s>``; only the answer and ``</s>`` are labelled.
* ChatGLM3 (its ``finetune_demo``): ``[gMASK] sop <|user|>\\n{source}<|assistant|>\\n``, then the answer and
  ``</s>``. The ``\\n`` after ``<|assistant|>`` (the empty metadata line of the assistant message) is part of the
  prompt here, so prediction starts exactly where training's labels start.

Which of the two: ``chatglm.tokenization_chatglm2.tokenizer_class_for`` (the checkpoint's ``_name_or_path``, or a
saved tokenizer_config.json naming ``ChatGLM3Tokenizer``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatglm import ChatGLM2ForCausalLM, ChatGLM2Tokenizer, ChatGLM3Tokenizer
from chatglm.chatglm2 import is_chatglm2_config
from chatglm.tokenization_chatglm2 import tokenizer_class_for
from glmft.families.base import build_own, cut_text
from glmft.families.virtual import standard_forward_args

NAME = "chatglm2"
END = "eos"
LABEL_PROMPT_END = False
LOSS_KWARGS: dict = {}  # transformers' causal-LM loss needs every position's logits
LOSS_LOGITS = "all"  # which positions get logits in training: the memory estimate's loss head
QUANTIZATION = True


def matches(config: dict) -> bool:
    return config.get("model_type") == "chatglm" and is_chatglm2_config(config)


def owns_tokenizer(tokenizer) -> bool:
    return isinstance(tokenizer, ChatGLM2Tokenizer)


def load_tokenizer(path: Path) -> ChatGLM2Tokenizer:
    return tokenizer_class_for(path).from_pretrained(path)  # pads on the left


def build_model(path: Path, dtype: torch.dtype, overrides: dict, meta: bool) -> ChatGLM2ForCausalLM:
    return build_own(ChatGLM2ForCausalLM, path, dtype, overrides, meta)


def prompt(tokenizer, source: str, max_src_len: int) -> tuple[list[int], bool]:
    source, cut = cut_text(tokenizer, source, max_src_len)
    if isinstance(tokenizer, ChatGLM3Tokenizer):
        return [*tokenizer.build_chat_ids(source), *tokenizer.sp.encode("\n")], cut
    return tokenizer.encode(tokenizer.build_prompt(source)), cut  # [gMASK] sop first


def num_layers(config) -> int:
    return config.num_layers


def layers_path(model) -> str:
    return "model.layers"


def parts(model) -> dict[str, tuple[str, ...]]:
    return {"all": ("",), "mlp": (".mlp.",), "attention": (".self_attn.",)}


def adapter_sites(model) -> tuple[str, ...]:
    return ("self_attn.o_proj", "mlp.down_proj")


def lora_targets(model) -> list[str]:
    # The original's fused query_key_value is q_proj, k_proj and v_proj here (chatglm/chatglm2/convert.py): the
    # same matrices, but three adapters (three A matrices where THUDM's LoRA has one).
    return ["q_proj", "k_proj", "v_proj"]


def ia3_targets(model) -> tuple[list[str], list[str]]:
    return ["k_proj", "v_proj", "down_proj"], ["down_proj"]  # PEFT's defaults for llama, the same module names


def prefix_encoder(model):
    return model.prefix_encoder


virtual_forward_args = standard_forward_args  # virtual tokens as inputs_embeds, positions over the extended mask
