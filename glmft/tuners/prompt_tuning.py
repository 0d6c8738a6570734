"""Prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` trained embeddings before every input, the model
frozen. PEFT's ``PromptEmbedding`` holds them; glmft.families.virtual places them on every family (ChatGLM v1
included) with generation, cache and left padding right.

``--prompt_init text`` starts them from the embeddings of ``--prompt_init_text`` (a "hard" prompt made soft),
repeated or cut to the number of tokens as PEFT's TEXT init does. Those rows are copied here rather than by PEFT:
PEFT's TEXT init reloads a tokenizer through ``AutoTokenizer`` from a path and keeps the special tokens it adds
(ChatGLM's ``[gMASK]``/``<sop>``, BOS), while here the text is encoded by the model family's own tokenizer without
special tokens, so the virtual tokens are the text's words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType
from peft.tuners.prompt_tuning import PromptEmbedding
from torch import nn

from glmft.args import opt
from glmft.families import virtual
from glmft.tuners.base import enable, freeze_all

NAME = "prompt_tuning"
# Lester et al. trained with a rate of 0.3 (Adafactor); PEFT's examples use 3e-2 with AdamW, which we take.
DEFAULT_LR = 3e-2
INITS = ("random", "text")


@dataclass
class Args:
    num_virtual_tokens: int = opt(16, "trained embeddings placed before every input")
    prompt_init: str = opt("random", "how they start: random (PEFT's, N(0, 1)) or text (the embeddings of "
                           "--prompt_init_text)")
    prompt_init_text: str = opt("", "with --prompt_init text: the text whose token embeddings start the prompt")

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"--num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")
        if self.prompt_init not in INITS:
            raise ValueError(f"--prompt_init must be one of {', '.join(INITS)}, got {self.prompt_init!r}")
        if (self.prompt_init == "text") != bool(self.prompt_init_text.strip()):
            raise ValueError("--prompt_init text needs --prompt_init_text, and --prompt_init_text needs "
                             "--prompt_init text")


def describe(args: Args) -> str:
    start = f"from the text {args.prompt_init_text!r}" if args.prompt_init == "text" else "random start"
    return f"prompt_tuning ({args.num_virtual_tokens} virtual tokens, {start})"


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    words = model.get_input_embeddings()
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                                token_dim=words.weight.shape[1], num_transformer_submodules=1,
                                prompt_tuning_init=PromptTuningInit.RANDOM)
    with torch.device(words.weight.device):
        encoder = PromptEmbedding(config, words).to(words.weight.dtype)
    if args.prompt_init == "text" and words.weight.device.type != "meta":  # a dry run counts, it copies nothing
        with torch.no_grad():
            encoder.embedding.weight.copy_(words(text_ids(model, args.prompt_init_text, args.num_virtual_tokens)))
    virtual.attach(model, encoder, args.num_virtual_tokens)
    enable(encoder.parameters())
    return model


def text_ids(model: nn.Module, text: str, count: int) -> torch.Tensor:
    """The text's token ids (the family's tokenizer, no special tokens), repeated or cut to ``count``."""
    from glmft import families

    path = model.config._name_or_path or getattr(model, "name_or_path", "")
    if not path:
        raise ValueError("--prompt_init text needs the model's tokenizer: load the model from its directory")
    ids = families.of_model(model).load_tokenizer(path).encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"--prompt_init_text {text!r} has no tokens")
    ids = (ids * math.ceil(count / len(ids)))[:count]
    return torch.tensor(ids, device=model.get_input_embeddings().weight.device)
