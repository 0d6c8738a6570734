"""Parity with the original implementation: logits, losses and greedy tokens stored by the original code in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file

from chatglm import ChatGLMForConditionalGeneration

CASES = ["gmask_train", "batch_right_pad", "mask_middle", "prefix_proj0", "prefix_proj1"]


@pytest.fixture(scope="module")
def golden():
    root = shared_path("fixtures", "chatglm-tiny")
    return root, load_file(root / "golden.safetensors"), json.loads((root / "golden.json").read_text())["cases"]


def load(root, impl: str, **overrides) -> ChatGLMForConditionalGeneration:
    return ChatGLMForConditionalGeneration.from_pretrained(
        root / "model", dtype=torch.float32, attn_implementation=impl, **overrides
    ).eval()


def fixture_labels(ids: torch.Tensor, config) -> torch.Tensor:
    """The fixture's labels: -100 up to and including [gMASK] and on pads; the ids themselves from <sop> on."""
    labels = ids.clone()
    positions = torch.arange(ids.shape[1])
    bos = (ids == config.bos_token_id).int().argmax(1, keepdim=True)
    labels[positions < bos] = -100
    labels[ids == config.pad_token_id] = -100
    return labels


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_original(golden, case, impl):
    root, tensors, meta = golden
    overrides = {}
    if case.startswith("prefix"):
        overrides = dict(pre_seq_len=4, prefix_projection=case.endswith("1"))
    model = load(root, impl, **overrides)
    if overrides:
        prefix = {k.split(".prefix_encoder.", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{case}.prefix_")}
        model.transformer.prefix_encoder.load_state_dict(prefix)
    ids = tensors[f"{case}.input_ids"]
    expected_loss = meta[case]["loss"]
    labels = fixture_labels(ids, model.config) if expected_loss is not None else None
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits
    torch.testing.assert_close(logits[..., :512], tensors[f"{case}.logits_head"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits[..., 130000:130010], tensors[f"{case}.logits_special"], rtol=0, atol=1e-4)
    assert torch.equal(logits.argmax(-1), tensors[f"{case}.argmax"])
    logprob = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(logprob, tensors[f"{case}.next_logprob"], rtol=0, atol=1e-4)
    if expected_loss is not None:
        assert abs(out.loss.item() - expected_loss) <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_greedy_generation_with_cache_matches_original(golden, impl):
    root, _, meta = golden
    model = load(root, impl)
    prompt = torch.tensor([meta["greedy"]["prompt"]])
    new = len(meta["greedy"]["output"]) - prompt.shape[1]
    out = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, use_cache=True)
    assert out[0].tolist() == meta["greedy"]["output"]
