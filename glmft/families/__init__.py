"""Model families, one module each, looked up from a checkpoint's ``config.json`` (or a built model or tokenizer).

A family owns everything that differs between model lines, so that the tuners, the training loop, predict, the
tasks and compare stay the same for all of them:

* ``NAME``; ``matches(config: dict) -> bool`` on a config.json's contents (the last family, ``causal_lm``, takes
  whatever transformers' AutoModelForCausalLM knows);
* loading: ``load_tokenizer(path)`` (left padding for batched generation, a pad token) and ``build_model(path,
  dtype, overrides, meta)`` (config overrides such as P-Tuning's ``pre_seq_len`` and ``quantization_bit``, refused
  where the family has no such thing; ``meta``: shapes only, from config.json, for dry runs);
* the example layout: ``prompt(tokenizer, source, max_src_len) -> (ids, source_cut)``, what the model reads before
  its answer at training and at prediction time alike, and ``END``, how the answer ends (``"eos"``: the tokenizer's
  end token); ``LABEL_PROMPT_END``: whether the prompt's last token is a label too (ChatGLM v1's ``<sop>``);
* ``LOSS_KWARGS``: extra forward arguments with ``labels`` (v1 computes its loss before trimming the logits, so it
  can return only the last position's); ``LOSS_LOGITS``: ``"answer"`` where the model computes the output layer on
  the labelled positions only (v1), else ``"all"`` (for the memory estimate);
* layers: ``layers_path(model)`` (the ModuleList ``freeze`` counts in), ``num_layers(config)``, ``parts(model)``
  (what ``--trainable_part attention|mlp`` matches), ``adapter_sites(model)``;
* method defaults: ``lora_targets(model)``, ``ia3_targets(model) -> (targets, feedforward)``;
* the P-Tuning v2 prefix: ``prefix_encoder(model)``, its module where the model was built with ``pre_seq_len``
  (built into ChatGLM; attached to other causal LMs by glmft.families.prefix), else ``None``;
* input-level virtual tokens (prompt tuning, P-Tuning v1): ``virtual_forward_args(model, extended, position_ids,
  count, length, first)``, the forward arguments that hand the model its tokens with the virtual ones among them
  (glmft.families.virtual);
* ``QUANTIZATION``: whether ``--quantization_bit`` (our INT4/INT8 layers) applies.

Adding a family is its module plus one entry in ``FAMILIES``.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

from glmft.families import causal_lm, chatglm, chatglm2

FAMILIES: dict[str, types.ModuleType] = {m.NAME: m for m in (chatglm, chatglm2, causal_lm)}  # causal_lm last


def of_config(config: dict, where: str = "config.json") -> types.ModuleType:
    for family in FAMILIES.values():
        if family.matches(config):
            return family
    raise ValueError(f"{where}: model_type {config.get('model_type')!r} is none of the families "
                     f"({', '.join(FAMILIES)}) and transformers' AutoModelForCausalLM does not know it")


def of_dir(path: str | Path) -> types.ModuleType:
    """The family of a model directory (or of a config.json's directory)."""
    config_file = Path(path) / "config.json"
    return of_config(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))


def of_model(model) -> types.ModuleType:
    """The family of a built model (also inside a PEFT wrapper or a DeepSpeed engine)."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    return of_config(model.config.to_dict(), type(model.config).__name__)


def of_tokenizer(tokenizer) -> types.ModuleType:
    """The family whose example layout a tokenizer goes with."""
    for family in FAMILIES.values():
        if family.owns_tokenizer(tokenizer):
            return family
    raise AssertionError("causal_lm owns every tokenizer")  # pragma: no cover


def get(name: str) -> types.ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
