"""Shared fixtures: a tiny ChatGLM on the CPU and the path to ../shared (tests that need it skip without it)."""

from __future__ import annotations

import os
import socket
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
# Each method's options at tiny-model sizes (the rest at their defaults), for tests that run every method of the table.
SMALL_METHOD_ARGS = {"freeze": {"num_trainable_layers": 1}, "pt": {"pre_seq_len": 3}, "lora": {"lora_r": 4},
                     "adapter": {"adapter_size": 8}, "prompt_tuning": {"num_virtual_tokens": 3},
                     "p_tuning": {"num_virtual_tokens": 3}, "adalora": {"init_r": 4, "target_r": 2, "total_step": 10}}


def small_args(tuner):
    """The tuner's Args at tiny-model sizes."""
    return tuner.Args(**SMALL_METHOD_ARGS.get(tuner.NAME, {}))


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


@pytest.fixture(scope="session")
def group():
    """A one-rank gloo process group, as ``python finetuning_x.py`` makes, shared by every in-process DeepSpeed test
    and destroyed at the end of the session: DeepSpeed caches its groups (the sequence-data-parallel group among them)
    at module level, so a group destroyed by one test module and made again by the next leaves those caches pointing
    at the destroyed one ("Group ... is not registered")."""
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deepspeed.init_distributed(dist_backend="gloo")
    finally:  # the rendezvous is done: scripts that later tests start must not inherit this port (EADDRINUSE)
        restore(saved, keep=("LOCAL_RANK",))
    yield  # LOCAL_RANK stays while the group lives: deepspeed.initialize asserts it (a launcher would have set it)
    dist.destroy_process_group()
    restore(saved)


def restore(saved: dict, keep: tuple = ()) -> None:
    for k, v in saved.items():
        if k in keep:
            continue
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """The tiny model made to produce varied text: an untied random output layer and louder attention (the tied
    random model just repeats its last input token), saved with the tokenizer as a base-model directory."""
    model, tok = chatglm.tiny()
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.transformer.layers:
            layer.attention.query_key_value.weight.mul_(10.0)
            layer.attention.dense.weight.mul_(30.0)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(64, model.config.vocab_size, bias=False)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
