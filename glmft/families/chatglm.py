"""ChatGLM-6B (v1): our own model (``chatglm/``), the official checkpoint layout, INT4/INT8, the built-in P-Tuning v2
prefix encoder. Example layout as the seeds laid it out (the spec, section 8)::

    input_ids = source + [gMASK] + <sop> + answer + <eop>
    labels    = -100 * (len(source) + 1) + <sop> + answer + <eop>
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatglm import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from chatglm.chatglm2 import is_chatglm2_config
from glmft.families.base import build_own, source_ids

NAME = "chatglm"
END = "eos"  # <eop> is this tokenizer's eos
LABEL_PROMPT_END = True  # <sop> is labelled, as in the seeds' layout
LOSS_KWARGS = {"logits_to_keep": 1}  # the loss is taken over every position before the logits are trimmed
LOSS_LOGITS = "answer"  # which positions get logits in training: the memory estimate's loss head
QUANTIZATION = True


def matches(config: dict) -> bool:
    return config.get("model_type") == "chatglm" and not is_chatglm2_config(config)


def owns_tokenizer(tokenizer) -> bool:
    return isinstance(tokenizer, ChatGLMTokenizer)


def load_tokenizer(path: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(path)  # pads on the left already


def build_model(path: Path, dtype: torch.dtype, overrides: dict, meta: bool) -> ChatGLMForConditionalGeneration:
    return build_own(ChatGLMForConditionalGeneration, path, dtype, overrides, meta)


def prompt(tokenizer, source: str, max_src_len: int) -> tuple[list[int], bool]:
    ids, cut = source_ids(tokenizer, source, max_src_len)
    return [*ids, tokenizer.gmask_token_id, tokenizer.bos_token_id], cut


def num_layers(config) -> int:
    return config.num_layers


def layers_path(model) -> str:
    return "transformer.layers"


def parts(model) -> dict[str, tuple[str, ...]]:
    return {"all": ("",), "mlp": (".mlp.",), "attention": (".attention.",)}


def adapter_sites(model) -> tuple[str, ...]:
    return ("attention.dense", "mlp.dense_4h_to_h")  # each sublayer's output projection


def lora_targets(model) -> list[str]:
    return ["query_key_value"]  # the seeds' and THUDM's choice


def ia3_targets(model) -> tuple[list[str], list[str]]:
    # PEFT has no (IA)^3 defaults for ChatGLM; its defaults for BLOOM, which shares these module names.
    return ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]


def prefix_encoder(model):
    return getattr(model.transformer, "prefix_encoder", None)  # only with pre_seq_len


def virtual_forward_args(model, extended: dict, position_ids, count: int, length: int, first: bool) -> dict:
    """Virtual tokens (glmft.families.virtual) on ChatGLM v1, which reads its layout from ``input_ids``: a starting
    forward gets placeholder ids in the virtual slots beside the embeddings, so the model builds its bidirectional
    context (the virtual tokens lie before <sop>, inside it) and its 2D positions over them itself; a cached step's
    position (from ``generate``, counted over the real tokens) moves by ``count``: the mask position it repeats sits
    ``count`` later, while the block position counts from <sop> and is unchanged."""
    if first:
        return {"input_ids": extended["ids"], "inputs_embeds": extended["embeds"],
                "attention_mask": extended["mask"], "position_ids": None}
    if position_ids is None:
        raise ValueError("position_ids are needed when continuing from a cache (generate() passes them)")
    shifted = position_ids.clone()
    shifted[:, 0] += count
    return {"attention_mask": extended["mask"], "position_ids": shifted}
