"""Any decoder-only model transformers loads natively with AutoModelForCausalLM (bloom, llama, qwen2, glm/glm4, ...).

Example layout: with a chat template in the tokenizer, the source as one user message with the generation prompt
(``apply_chat_template(..., add_generation_prompt=True)``); without one, the source as the tokenizer encodes a text
(its BOS where it adds one). Then the answer and the tokenizer's EOS; only those are labelled.

Layer paths and method defaults come from the model itself: the layer list is the ModuleList of
``num_hidden_layers`` blocks; LoRA and (IA)^3 targets are PEFT's defaults for the model type; the adapter sites
are the output projections of each block's attention and MLP (the last linear layer of each that writes the hidden
size). P-Tuning v2 is ChatGLM2's prefix attached to the loaded model (glmft.families.prefix).
Our INT4/INT8 layers are ChatGLM's; asked for here, they are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from glmft.families.base import cut_text, layer_list_path
from glmft.families.prefix import attach, supports_prefix
from glmft.families.virtual import standard_forward_args

NAME = "causal_lm"
END = "eos"
LABEL_PROMPT_END = False
LOSS_KWARGS: dict = {}
LOSS_LOGITS = "all"  # which positions get logits in training: the memory estimate's loss head
QUANTIZATION = False
REFUSED = {
    "quantization_bit": "--quantization_bit quantizes ChatGLM's layers with our INT4/INT8 kernels; {model_type} "
                        "loads in floating point here",
}
PREFIX_FIELDS = ("pre_seq_len", "prefix_projection")  # P-Tuning v2: glmft.families.prefix, attached after loading


def matches(config: dict) -> bool:
    return config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def owns_tokenizer(tokenizer) -> bool:
    return True  # asked last: every tokenizer the ChatGLM families do not own


def load_tokenizer(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no eos token, so an answer cannot end (set eos_token in "
                         "tokenizer_config.json)")
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last real token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere; the id itself never trains
    return tokenizer


def build_config(path: Path, overrides: dict):
    config = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        if value and key in REFUSED:
            raise ValueError(REFUSED[key].format(model_type=config.model_type))
        if value:
            setattr(config, key, value)
    return config


def build_model(path: Path, dtype: torch.dtype, overrides: dict, meta: bool) -> nn.Module:
    prefix = {k: overrides[k] for k in PREFIX_FIELDS if k in overrides}
    config = build_config(path, {k: v for k, v in overrides.items() if k not in PREFIX_FIELDS})
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    if prefix.get("pre_seq_len"):
        if not supports_prefix(model):
            raise ValueError(f"pt (P-Tuning v2) hands its prefix over through the model's transformers cache; "
                             f"{config.model_type}'s forward takes none: use lora, ia3, adapter, bitfit, freeze or "
                             "embedding")
        attach(model, prefix["pre_seq_len"], bool(prefix.get("prefix_projection")))
    return model


def prompt(tokenizer, source: str, max_src_len: int) -> tuple[list[int], bool]:
    source, cut = cut_text(tokenizer, source, max_src_len)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": source}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False), cut
    ids = tokenizer.encode(source)  # with the BOS the tokenizer adds, if any
    return (ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids), cut


def num_layers(config) -> int:
    return config.num_hidden_layers


def layers_path(model) -> str:
    return layer_list_path(model, num_layers(model.config))


def _sublayers(model) -> dict[str, str]:
    """The attention and MLP children of a block, by name (``self_attn``/``self_attention``, ``mlp``)."""
    block = model.get_submodule(layers_path(model))[0]
    found = {}
    for name, _ in block.named_children():
        if "att" in name and "norm" not in name:
            found.setdefault("attention", name)
        elif "mlp" in name or "feed_forward" in name:
            found.setdefault("mlp", name)
    if len(found) != 2:
        raise ValueError(f"{type(block).__name__}: cannot tell its attention and MLP apart (children: "
                         f"{[n for n, _ in block.named_children()]})")
    return found


def parts(model) -> dict[str, tuple[str, ...]]:
    found = _sublayers(model)
    return {"all": ("",), "mlp": (f".{found['mlp']}.",), "attention": (f".{found['attention']}.",)}


def adapter_sites(model) -> tuple[str, ...]:
    block = model.get_submodule(layers_path(model))[0]
    hidden = model.config.hidden_size
    sites = []
    for child in _sublayers(model).values():
        writers = [name for name, m in block.get_submodule(child).named_modules()
                   if isinstance(m, nn.Linear) and m.out_features == hidden]
        if not writers:
            raise ValueError(f"{child}: no linear layer writes the hidden size {hidden}")
        sites.append(f"{child}.{writers[-1]}")
    return tuple(sites)


def _peft_default(table: dict, model, what: str) -> list[str]:
    model_type = model.config.model_type
    if model_type not in table:
        raise ValueError(f"PEFT has no default {what} for model_type {model_type!r}: name the modules "
                         f"(--{what.split()[0]}_target)")
    return list(table[model_type])


def lora_targets(model) -> list[str]:
    return _peft_default(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, model, "lora targets")


def ia3_targets(model) -> tuple[list[str], list[str]]:
    return (_peft_default(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, model, "ia3 targets"),
            _peft_default(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, model, "ia3 feed-forward modules"))


def prefix_encoder(model):
    return getattr(model, "prefix_encoder", None)  # only when built with pre_seq_len


virtual_forward_args = standard_forward_args  # virtual tokens as inputs_embeds, positions over the extended mask
