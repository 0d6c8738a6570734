"""generate(): batches of different lengths (left padded) equal one prompt at a time; cache on/off agree."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SPECIAL, prompt, tiny_model
from test_model_invariants import sharpen

PROMPTS = [prompt([10, 11, 12, 13, 14, 15]), prompt([20, 21]), prompt([30, 31, 32, 33]), prompt([40])]


def varied(model):
    """A random untied output layer: with the tied one a random model just repeats its last input token."""
    torch.manual_seed(1)
    with torch.no_grad():  # and a louder attention output, so the context (not only the last token) decides
        for layer in model.transformer.layers:
            layer.attention.dense.weight.mul_(30.0)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    return model


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[TINY_SPECIAL["pad_token_id"]] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def generate(model, rows, **kwargs) -> list[list[int]]:
    ids, mask = left_pad(rows)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, **kwargs}
    out = model.generate(ids, attention_mask=mask, pad_token_id=TINY_SPECIAL["pad_token_id"], **kwargs)
    return [row[ids.shape[1] :].tolist() for row in out]


@pytest.mark.parametrize("overrides", [{}, {"pre_seq_len": 3}, {"pre_seq_len": 3, "prefix_projection": True}])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_batched_left_padded_greedy_equals_one_at_a_time(overrides, impl):
    model = varied(sharpen(tiny_model(attn_implementation=impl, **overrides), factor=10.0))
    batched = generate(model, PROMPTS)
    single = [generate(model, [p])[0] for p in PROMPTS]
    assert batched == single
    assert len({tuple(r) for r in batched}) > 1  # the prompts really lead to different continuations


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3}])
def test_cache_and_no_cache_agree(kwargs):
    model = varied(sharpen(tiny_model(), factor=10.0))
    cached = generate(model, PROMPTS[:2], use_cache=True, **kwargs)
    assert cached == generate(model, PROMPTS[:2], use_cache=False, **kwargs)


def test_sampling_is_reproducible_with_a_seed_and_stops_at_eop():
    model = varied(tiny_model())
    torch.manual_seed(0)
    a = generate(model, PROMPTS, do_sample=True, top_p=0.9, temperature=1.0)
    torch.manual_seed(0)
    b = generate(model, PROMPTS, do_sample=True, top_p=0.9, temperature=1.0)
    assert a == b
    assert a != generate(model, PROMPTS, do_sample=True, top_p=0.9, temperature=1.0)  # the seed matters
    # Point <eop>'s output row at the prompt's last hidden state: generation emits it and stops there.
    eop = TINY_SPECIAL["eos_token_id"]
    with torch.no_grad():
        hidden = model.transformer(torch.tensor([PROMPTS[0]])).last_hidden_state[0, -1]
        model.lm_head.weight[eop] = 100 * hidden / hidden.norm()
    assert generate(model, PROMPTS[:1], eos_token_id=eop, max_new_tokens=5) == [[eop]]
