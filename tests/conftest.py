"""Shared fixtures: a tiny ChatGLM on the CPU and the path to ../shared (tests that need it skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

import chatglm
from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# A small vocabulary with the special ids placed at its end, as the real one has them after the text pieces.
TINY_SPECIAL = dict(mask_token_id=90, gmask_token_id=91, bos_token_id=94, eos_token_id=95, pad_token_id=3)


def tiny_config(**overrides) -> ChatGLMConfig:
    fields = dict(
        vocab_size=100, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
        max_sequence_length=256, **TINY_SPECIAL,
    )
    fields.update(overrides)
    return ChatGLMConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    return ChatGLMForConditionalGeneration(tiny_config(**overrides)).eval()


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside this checkout)")
    return path


def prompt(text_ids: list[int], answer: list[int] | None = None, eop: bool = False) -> list[int]:
    """ids laid out as the tokenizer builds them: text, [gMASK], <sop>, answer, (<eop>)."""
    s = TINY_SPECIAL
    return text_ids + [s["gmask_token_id"], s["bos_token_id"]] + (answer or []) + ([s["eos_token_id"]] if eop else [])


@pytest.fixture
def model() -> ChatGLMForConditionalGeneration:
    return tiny_model()


__all__ = ["chatglm", "tiny_config", "tiny_model", "shared_path", "prompt", "ROOT", "SHARED", "TINY_SPECIAL"]
