"""Input-level virtual tokens (prompt_tuning, p_tuning; glmft.families.virtual) on every family: what trains, that
the virtual tokens are read, generation with the cache equals generation without it and a left-padded batch equals
one prompt at a time, logits line up with input_ids, the text init, a save round trip, and the seeds' bloom counts."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path, tiny_model
from family_models import build
from test_families import decisive, family_prompts, generation_agrees
from test_generation import PROMPTS, generate, varied
from test_model_invariants import sharpen

import chatglm
from glmft.families import chatglm as chatglm_family
from glmft.model import build_model, count_parameters, summary_line
from glmft.tuners import TUNERS

H, V = 64, 3  # the tiny models' hidden size; virtual tokens here
CASES = {  # method options, closed-form trainable count on a model of hidden size H
    "prompt_tuning": ({"num_virtual_tokens": V}, V * H),
    "p_tuning": ({"num_virtual_tokens": V}, V * H + 3 * (H * H + H)),  # embedding, three square layers
    "p_tuning_lstm": ({"num_virtual_tokens": V, "encoder_type": "lstm"},
                      V * H + 2 * (4 * H * (H + H) + 8 * H) + 2 * (4 * H * (2 * H + H) + 8 * H)
                      + (2 * H * 2 * H + 2 * H) + (2 * H * H + H)),
}


def applied(case: str, model, moved: float = 0.5):
    method = "p_tuning" if case.startswith("p_tuning") else case
    tuner = TUNERS[method]
    model = tuner.apply(model, tuner.Args(**CASES[case][0]))
    torch.manual_seed(7)
    with torch.no_grad():  # move the trainable tensors as training would: the virtual tokens must matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * moved)
    return model.eval()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("virtual")
    return {kind: build(root, kind) for kind in ("chatglm2", "bloom", "llama")}


@pytest.mark.parametrize("case", CASES)
def test_exact_trainable_tensors_counts_and_gradients_on_chatglm(case):
    model = applied(case, tiny_model(), moved=0.0).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    assert count_parameters(model)[0] == CASES[case][1]
    ids = torch.tensor(PROMPTS[:1])
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


@pytest.mark.parametrize("case", CASES)
def test_chatglm_generation_with_cache_equals_without_and_batched_equals_one_at_a_time(case):
    model = applied(case, varied(sharpen(tiny_model(), factor=10.0)))
    cached = generate(model, PROMPTS, use_cache=True)
    assert cached == generate(model, PROMPTS, use_cache=False)
    assert cached == [generate(model, [p], use_cache=True)[0] for p in PROMPTS]
    assert len({tuple(r) for r in cached}) > 1
    assert cached != generate(varied(sharpen(tiny_model(), factor=10.0)).eval(), PROMPTS)  # the tokens are read


def test_positional_arguments_and_logits_line_up_with_the_input():
    model = applied("p_tuning", varied(sharpen(tiny_model(), factor=10.0)))
    ids = torch.tensor([[3, 3, *PROMPTS[1]], PROMPTS[2]])
    mask = torch.tensor([[0, 0] + [1] * len(PROMPTS[1]), [1] * len(PROMPTS[2])])
    with torch.no_grad():
        by_name = model(input_ids=ids, attention_mask=mask).logits
        assert by_name.shape[:2] == ids.shape
        assert torch.equal(model(ids, mask).logits, by_name)  # the mask given positionally is not dropped
        alone = model(input_ids=ids[:1, 2:]).logits  # the padded row read without its pads
    torch.testing.assert_close(by_name[0, 2:], alone[0], rtol=0, atol=1e-5)


def test_a_cached_step_at_the_wrong_position_is_caught(monkeypatch):
    """The deliberately broken variant: cached steps keep generate's positions (not moved past the virtual tokens),
    so cached generation leaves the uncached one: the equality above is what guards the position shift."""
    model = applied("prompt_tuning", varied(sharpen(tiny_model(), factor=10.0)))
    right = generate(model, PROMPTS, use_cache=True)
    unshifted = chatglm_family.virtual_forward_args

    def broken(model, extended, position_ids, count, length, first):
        return unshifted(model, extended, position_ids, 0 if not first else count, length, first)

    monkeypatch.setattr(model, "_virtual_forward_args", broken)  # the family's function, as attach() took it
    assert generate(model, PROMPTS, use_cache=True) != right
    assert generate(model, PROMPTS, use_cache=False) == right  # uncached steps never take the shift


@pytest.mark.parametrize("kind", ["chatglm2", "bloom", "llama"])
@pytest.mark.parametrize("case", ["prompt_tuning", "p_tuning"])
def test_other_families_generate_the_same_cached_uncached_and_batched(family_dirs, kind, case):
    model = applied(case, decisive(build_model(family_dirs[kind])), moved=0.3)
    tokenizer, prompts = family_prompts(family_dirs[kind])
    generation_agrees(model, tokenizer, prompts)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.shape[:2] == ids.shape  # the virtual positions are not in the output
        model.prompt_encoder.embedding.weight.add_(1.0)
        assert not torch.allclose(model(input_ids=ids).logits, logits)


def test_text_init_starts_from_the_texts_token_embeddings():
    tuner = TUNERS["prompt_tuning"]
    model = chatglm.ChatGLMForConditionalGeneration.from_pretrained(chatglm.TINY_DIR)
    tokenizer = chatglm.ChatGLMTokenizer.from_pretrained(chatglm.TINY_DIR)
    ids = tokenizer.encode("小明的父亲", add_special_tokens=False)
    tuner.apply(model, tuner.Args(num_virtual_tokens=len(ids) + 2, prompt_init="text", prompt_init_text="小明的父亲"))
    words = model.get_input_embeddings().weight
    assert torch.equal(model.prompt_encoder.embedding.weight, words[[*ids, *ids[:2]]])  # repeated to fill
    with pytest.raises(ValueError, match="--prompt_init text needs --prompt_init_text"):
        tuner.Args(prompt_init="text")


@pytest.mark.parametrize("method,options,line", [
    ("prompt_tuning", {"num_virtual_tokens": 7},
     "trainable params: 14,336 || all params: 1,303,126,016 || trainable%: 0.0011"),
    ("p_tuning", {"num_virtual_tokens": 10, "encoder_type": "mlp"},
     "trainable params: 12,609,536 || all params: 1,315,721,216 || trainable%: 0.9584"),
    ("p_tuning", {"num_virtual_tokens": 10, "encoder_type": "lstm"},
     "trainable params: 193,030,144 || all params: 1,496,141,824 || trainable%: 12.9019"),
])
def test_bloom_1b4_zh_counts_are_the_seeds_peft_table(method, options, line):
    config = shared_path("fixtures", "configs", "bloom-1b4-zh", "config.json")
    tuner = TUNERS[method]
    assert summary_line(tuner.apply(build_model(config, torch.float16, meta=True), tuner.Args(**options))) == line

