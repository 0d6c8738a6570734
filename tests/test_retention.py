"""Forgetting (glmft/retention.py): a model against itself moved nowhere; a model whose logits were softened (every
argmax kept, every argmax less likely) finds the base's answers less likely without changing them; noisy weights
change answers; the shipped prompt file; bad prompt files name file, line and field."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT

from glmft import retention
from glmft.data import DataError
from glmft.model import build_model, load_tokenizer


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return retention.load_prompts()  # the shipped data/retention.jsonl, found from any directory


@pytest.fixture(scope="module")
def mini():
    """The pretrained mini model (its greedy answers are text, not one repeated id) and its base reference."""
    tokenizer, model = load_tokenizer("mini"), build_model("mini").eval()
    return tokenizer, model, retention.reference(model, tokenizer, retention.load_prompts(), max_new_tokens=16)


def test_the_shipped_prompts_cover_questions_translation_and_code_in_both_languages():
    text = (ROOT / retention.DEFAULT_PATH).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["prompt"] for r in rows] == retention.load_prompts()
    assert len(rows) >= 12 and {r["lang"] for r in rows} == {"zh", "en"}
    assert {"question", "translation", "code"} <= {r["kind"] for r in rows}


def test_a_model_against_itself_moved_nowhere(prompts):
    tokenizer, model = load_tokenizer("tiny"), build_model("tiny").train()  # as a model fresh from training
    result = retention.retention(model, model, tokenizer, prompts, max_new_tokens=8)
    assert result["nll_delta"] == 0.0 and result["changed_rate"] == 0.0
    assert result["prompts"] == len(prompts) and result["answer_tokens"] > 0
    assert result["nll_base"] > 0 and len(result["per_prompt"]) == len(prompts)
    assert model.training, "the caller's mode is restored"


def test_softened_logits_make_the_base_answers_less_likely_but_keep_them(mini):
    """Halving the final layer norm's output halves every logit: each greedy token stays the argmax (no answer
    changes) and its probability falls (the top probability of softmax(z / T) falls as T grows), so the NLL rises."""
    tokenizer, _, ref = mini
    tuned = build_model("mini").eval()
    with torch.no_grad():
        norm = tuned.transformer.final_layernorm
        norm.weight.mul_(0.5)
        norm.bias.mul_(0.5)
    result = retention.measure(ref, tuned, tokenizer)
    assert result["nll_delta"] > 0.05, result["nll_delta"]
    assert result["changed_rate"] == 0.0


def test_noisy_weights_change_greedy_answers(mini):
    tokenizer, _, ref = mini
    tuned = build_model("mini").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.std())
    result = retention.measure(ref, tuned, tokenizer)
    assert result["changed_rate"] > 0 and result["nll_delta"] != 0
    assert any(row["base"] != row["tuned"] for row in result["per_prompt"] if row["changed"])


@pytest.mark.parametrize("line,message", [('{"prompt": ""}', "field 'prompt' must be a non-empty string"),
                                          ('{"text": "hi"}', "field 'prompt' must be a non-empty string"),
                                          ("{oops", "not valid JSON")])
def test_a_bad_prompt_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:3: {message}"):
        retention.load_prompts(path)
