"""Forgetting: how far a fine-tuned model moved from its base on prompts it was not trained for (``--retention_path``,
shipped: ``data/retention.jsonl``, general questions, translations and code requests in Chinese and English).

The base model's own greedy answers are the references. For each model, the negative log-likelihood of every
reference token (each answer up to and including its <eop>, when the base stopped within ``max_new_tokens``) given
the prompt; reported as the mean per token over all answers (``nll_base``, ``nll_tuned``) and their difference
``nll_delta`` (> 0: the tuned model finds the base's answers less likely; 0 for a model against itself). Also the
share of prompts whose greedy answer changed (``changed_rate``). Prompts go in as a one-turn query in the model
family's prompt layout (ChatGLM v1: the text followed by [gMASK] <sop>, its chat layout without history).

``reference`` and ``measure`` split the work so that a caller short of memory can free the base model before it
loads the tuned one, and score several tuned models against one reference.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from glmft import families, shipped
from glmft.data import DataError
from glmft.evaluate import greedy

DEFAULT_PATH = "data/retention.jsonl"


def load_prompts(path: str | Path = DEFAULT_PATH) -> list[str]:
    """The ``prompt`` of every line of a JSON-lines file (other keys, such as ``lang`` and ``kind``, are notes)."""
    path = Path(shipped.resolve(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"retention prompts not found: {path}")
    prompts = []
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise DataError(f"{path}:{number}: field 'prompt' must be a non-empty string")
        prompts.append(obj["prompt"])
    if not prompts:
        raise DataError(f"{path}:1: no prompts in the file")
    return prompts


@dataclass
class Reference:
    """The base model's side: each prompt's ids, the base's greedy answer ids and their per-token NLL sums."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    answers: list[list[int]]
    nll: list[float]  # summed over each answer's tokens
    max_new_tokens: int


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_nll(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Summed negative log-likelihood of ``answer_ids`` following ``prompt_ids`` (one sequence, no padding)."""
    device = model_device(model)
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids], device=device)
    loss = model(input_ids=ids, labels=labels, **families.of_model(model).LOSS_KWARGS).loss  # mean over the answer
    return float(loss) * len(answer_ids)


def _in_eval_mode(model):
    """Dropout off for the measurement (a model fresh from training may still be in train mode)."""
    was = model.training
    model.eval()
    return was


def reference(base_model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
              batch_size: int = 8) -> Reference:
    """The base model's greedy answers to ``prompts`` and their NLL under the base model itself."""
    was = _in_eval_mode(base_model)
    try:
        family = families.of_tokenizer(tokenizer)
        prompt_ids = [family.prompt(tokenizer, p, sys.maxsize)[0] for p in prompts]  # uncut, as one chat turn
        answers = greedy(base_model, tokenizer, prompt_ids, max_new_tokens, model_device(base_model), batch_size)
        nll = [answer_nll(base_model, p, a) for p, a in zip(prompt_ids, answers, strict=True)]
    finally:
        base_model.train(was)
    return Reference(list(prompts), prompt_ids, answers, nll, max_new_tokens)


def measure(ref: Reference, tuned_model, tokenizer, batch_size: int = 8) -> dict:
    """The tuned model against the base's reference: NLLs per token, their delta, the share of changed answers,
    and one row per prompt."""
    was = _in_eval_mode(tuned_model)
    try:
        nll = [answer_nll(tuned_model, p, a) for p, a in zip(ref.prompt_ids, ref.answers, strict=True)]
        tuned = greedy(tuned_model, tokenizer, ref.prompt_ids, ref.max_new_tokens, model_device(tuned_model),
                       batch_size)
    finally:
        tuned_model.train(was)
    tokens = sum(len(a) for a in ref.answers)
    changed = [t != a for t, a in zip(tuned, ref.answers, strict=True)]
    rows = [{"prompt": p, "base": tokenizer.decode(a, skip_special_tokens=True).strip(),
             "tuned": tokenizer.decode(t, skip_special_tokens=True).strip(), "tokens": len(a),
             "nll_base": nb / len(a), "nll_tuned": nt / len(a), "changed": c}
            for p, a, t, nb, nt, c in zip(ref.prompts, ref.answers, tuned, ref.nll, nll, changed, strict=True)]
    base_mean, tuned_mean = sum(ref.nll) / tokens, sum(nll) / tokens
    return {"nll_base": base_mean, "nll_tuned": tuned_mean, "nll_delta": tuned_mean - base_mean,
            "changed_rate": sum(changed) / len(changed), "prompts": len(changed), "answer_tokens": tokens,
            "max_new_tokens": ref.max_new_tokens, "per_prompt": rows}


def retention(base_model, tuned_model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
              batch_size: int = 8) -> dict:
    """How far ``tuned_model`` moved from ``base_model`` on ``prompts`` (module docstring): ``nll_base``,
    ``nll_tuned``, ``nll_delta``, ``changed_rate``, ``prompts``, ``answer_tokens`` and ``per_prompt``."""
    if not prompts:
        raise ValueError("retention: no prompts")
    return measure(reference(base_model, tokenizer, prompts, max_new_tokens, batch_size), tuned_model, tokenizer,
                   batch_size)


def untuned(prompts: int) -> dict:
    """The untuned base model against itself: it moved nowhere, 0 by definition (nothing is computed, so no NLL)."""
    return {"nll_base": None, "nll_tuned": None, "nll_delta": 0.0, "changed_rate": 0.0, "prompts": prompts,
            "untuned": True, "per_prompt": []}


def format_summary(result: dict) -> str:
    """One line for predict's and compare's output."""
    if result.get("untuned"):
        return f"retention on {result['prompts']} general prompts: the untuned base model, 0 by definition"
    return (f"retention on {result['prompts']} general prompts ({result['answer_tokens']} base-answer tokens): "
            f"NLL {result['nll_base']:.4f} base -> {result['nll_tuned']:.4f} tuned (delta "
            f"{result['nll_delta']:+.4f}), answers changed {100 * result['changed_rate']:.1f}%")
