"""Embedding: train only the word embeddings (tied to the output layer, so both ends of the model learn)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glmft.tuners.base import enable, freeze_all

NAME = "embedding"
DEFAULT_LR = 1e-5


@dataclass
class Args:
    """The embedding method has no options of its own."""


def describe(args: Args) -> str:
    return "embedding (the input word embeddings only; the output layer too where it is tied to them, as in ChatGLM v1)"


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    enable([model.get_input_embeddings().weight])
    return model
