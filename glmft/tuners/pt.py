"""P-Tuning v2: train a prefix of virtual key/value tokens for every layer through the model's prefix encoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glmft import families
from glmft.args import opt
from glmft.tuners.base import enable, freeze_all

NAME = "pt"
DEFAULT_LR = 1e-2


@dataclass
class Args:
    pre_seq_len: int = opt(16, "number of virtual prefix tokens")
    prefix_projection: bool = opt(False, "pass the prefix through a two-layer MLP (many more trainable parameters); "
                                  "without it each layer's prefix is a plain embedding (the seeds' "
                                  "'PT-Only-Embedding')")

    def __post_init__(self) -> None:
        if self.pre_seq_len < 1:
            raise ValueError(f"--pre_seq_len must be at least 1, got {self.pre_seq_len}")


def describe(args: Args) -> str:
    kind = "with projection MLP" if args.prefix_projection else "no projection, the seeds' 'PT-Only-Embedding'"
    return f"pt (P-Tuning v2, {args.pre_seq_len} prefix tokens, {kind})"


def model_overrides(args: Args) -> dict:
    """The prefix encoder is part of the model, so its shape is fixed when the model is built."""
    return {"pre_seq_len": args.pre_seq_len, "prefix_projection": args.prefix_projection}


def apply(model: nn.Module, args: Args) -> nn.Module:
    encoder = families.of_model(model).prefix_encoder(model)
    if encoder is None or getattr(model.config, "pre_seq_len", None) != args.pre_seq_len:
        raise ValueError("pt: build the model with model_overrides(args) so it has a prefix encoder of "
                         f"{args.pre_seq_len} tokens (it has pre_seq_len={getattr(model.config, 'pre_seq_len', None)})")
    freeze_all(model)
    enable(encoder.parameters())
    return model
