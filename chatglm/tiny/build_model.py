"""Write the tiny model's ``config.json`` and random ``model.safetensors`` beside its tokenizer files.

Run from the repository root (after ``python -m chatglm.tiny.build_tokenizer`` when the data changed)::

    python -m chatglm.tiny.build_model

A 2-layer ChatGLM (hidden 64, 4 heads, inner 256) with the tokenizer's special ids and an embedding rounded up to a
multiple of 64 rows, so, as in the real model (130528 rows for 130344 pieces), some ids have no piece. Weights are
random (seed 0, the usual normal(0, 0.02) init): the tiny model exists to run every code path on a CPU, not to
say anything sensible.
"""

from __future__ import annotations

import torch

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from chatglm.tiny import TINY_DIR
from chatglm.tokenization_chatglm import ChatGLMTokenizer

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=256, max_sequence_length=2048)


def tiny_config(tokenizer: ChatGLMTokenizer) -> ChatGLMConfig:
    rows = -(-tokenizer.vocab_size // 64) * 64
    return ChatGLMConfig(
        vocab_size=rows,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPE,
    )


def main() -> None:
    tokenizer = ChatGLMTokenizer.from_pretrained(TINY_DIR)
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(tiny_config(tokenizer))
    model.save_pretrained(TINY_DIR)
    print(f"wrote {TINY_DIR}: {model.num_parameters():,} parameters, vocab {model.config.vocab_size}")


if __name__ == "__main__":
    main()
