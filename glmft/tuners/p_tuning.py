"""P-Tuning (v1; Liu et al., 2021): virtual tokens at the input produced by a trained prompt encoder, an MLP or a
bidirectional LSTM followed by an MLP, the model frozen. PEFT's ``PromptEncoder`` computes them (its parameters, so
the counts are PEFT's); glmft.families.virtual places them on every family (ChatGLM v1 included) with generation,
cache and left padding right. The encoder runs once per sequence, on its first forward; a cached decoding step
reuses the keys and values of the virtual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType
from peft.tuners.p_tuning import PromptEncoder
from torch import nn

from glmft.args import opt
from glmft.families import virtual
from glmft.tuners.base import enable, freeze_all

NAME = "p_tuning"
DEFAULT_LR = 1e-3  # PEFT's P-Tuning examples; the encoder is a fresh network, not a copy of the vocabulary
ENCODERS = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}


@dataclass
class Args:
    num_virtual_tokens: int = opt(16, "virtual tokens placed before every input")
    encoder_type: str = opt("mlp", "the prompt encoder: mlp (three layers) or lstm (a two-layer bidirectional LSTM, "
                            "then two layers of MLP)")
    encoder_hidden_size: int = opt(0, "the encoder's inner width (0: the model's hidden size, as the seeds' table)")
    encoder_dropout: float = opt(0.0, "dropout between the LSTM's layers")

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"--num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")
        if self.encoder_type not in ENCODERS:
            raise ValueError(f"--encoder_type must be one of {', '.join(ENCODERS)}, got {self.encoder_type!r}")
        if self.encoder_hidden_size < 0 or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError("--encoder_hidden_size must be 0 or more and --encoder_dropout in [0, 1)")


def describe(args: Args) -> str:
    width = args.encoder_hidden_size or "hidden size"
    return f"p_tuning ({args.num_virtual_tokens} virtual tokens, {args.encoder_type} encoder of width {width})"


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    like = model.get_input_embeddings().weight
    hidden = like.shape[1]
    config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                                 token_dim=hidden, num_transformer_submodules=1,
                                 encoder_reparameterization_type=ENCODERS[args.encoder_type],
                                 encoder_hidden_size=args.encoder_hidden_size or hidden,
                                 encoder_dropout=args.encoder_dropout)
    with torch.device(like.device):
        encoder = PromptEncoder(config).to(like.dtype)
    virtual.attach(model, encoder, args.num_virtual_tokens)
    enable(encoder.parameters())
    return model
