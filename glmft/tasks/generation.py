"""Scores for free text generation: ROUGE-1/2/L (F-score) and BLEU-4, by the convention of THUDM's P-Tuning
evaluation of ChatGLM-6B on ADGEN (``ptuning/main.py``, ``compute_metrics``), whose numbers its README publishes.

Per record, with the reference and the prediction exactly as given (the caller decodes and strips):

* ROUGE: both texts are segmented with jieba (``jieba.cut``), the words joined by single spaces and handed to
  ``rouge_chinese.Rouge().get_scores(hypothesis, reference)``; we keep the ``f`` of ``rouge-1``, ``rouge-2`` and
  ``rouge-l``.
* BLEU-4: ``nltk``'s ``sentence_bleu([list(reference)], list(prediction))`` on characters, default weights
  (0.25 each for 1..4-grams) and ``SmoothingFunction().method3``.
* Each score is multiplied by 100; the corpus value is the plain mean over records.

Empty texts. THUDM's evaluation has no guard: ``rouge_chinese`` raises ``ValueError("Hypothesis is empty.")``
(or ``"Reference is empty."``) when a text has no non-whitespace character, so an empty generation stops the
whole run (reported in THUDM/ChatGLM-6B #792, #825, THUDM/ChatGLM2-6B #300, THUDM/ChatGLM3 #930, #1312). The
fix that the projects built on the same recipe settled on (hiyouga/ChatGLM-Efficient-Tuning
``src/glmtuner/tuner/sft/metric.py``, which cites THUDM's main.py as its source, and hiyouga/LLaMA-Factory
``scripts/eval_bleu_rouge.py``) scores ROUGE 0 for a record whose jieba-joined hypothesis or
reference is whitespace only, keeps the record in the mean, and computes BLEU as usual (nltk gives 0 for an empty
hypothesis or reference). We do the same: the condition ``not text.split()`` is exactly the one on which
``rouge_chinese`` raises (it drops empty sentences after ``rstrip``), so every other record gets the library's
own numbers. An empty prediction therefore scores 0 everywhere, even against an empty reference.
Punctuation-only texts are not empty: they go through the libraries unchanged.

Differences from THUDM's code, on purpose: it rounds each record's score to 4 decimals before averaging; we keep
full precision (the means differ by at most 5e-5). ``mean_length`` is the mean number of characters of the
predictions and ``empty_rate`` the share of predictions with no non-whitespace character (THUDM reports
neither). jieba's start-up log is silenced; its prefix dictionary ships inside the package and its cache lives in
the temporary directory, so nothing here needs the network, and nltk's BLEU needs no downloaded data.

Several references (a test record whose target is a list, as in the seed d2q test file): the prediction is scored
against each and every metric takes its maximum over them (the convention ../shared/data/d2q/README.md adopts; THUDM's
evaluation has one reference per record). ``gold`` in predictions.jsonl then holds the list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from glmft.tasks.base import INSTRUCTION, Layout

NAME = "generation"
DEFAULT_PROMPT = ""  # THUDM's ADGEN fine-tuning gives the attribute list as is; instruction records bring their own
LAYOUTS = (Layout(("content",), "summary"), Layout(("text",), "answer"), INSTRUCTION)
USES_LABELS = False
MULTI_REFERENCE = True
HEADLINE = "rouge-l"
METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
COLUMNS = (("rouge-l", "ROUGE-L", "score"), ("rouge-1", "ROUGE-1", "score"), ("rouge-2", "ROUGE-2", "score"),
           ("bleu-4", "BLEU-4", "score"), ("mean_length", "gen. chars", "rate"), ("empty_rate", "empty", "share"))

jieba.setLogLevel(logging.WARNING)  # "Building prefix dict ..." is INFO on every first use in a process
_SMOOTHING = SmoothingFunction().method3


def _words(text: str) -> str:
    return " ".join(jieba.cut(text))


def record_scores(reference: str | Sequence[str], prediction: str) -> dict[str, float]:
    """The four scores of one record, each x100 (see the module docstring for the empty-text rule); several
    references: each metric's maximum over them."""
    if not isinstance(reference, str):
        each = [_one_reference(ref, prediction) for ref in reference]
        return {name: max(scores[name] for scores in each) for name in METRICS}
    return _one_reference(reference, prediction)


def _one_reference(reference: str, prediction: str) -> dict[str, float]:
    hypothesis, target = _words(prediction), _words(reference)
    if hypothesis.split() and target.split():
        rouge = Rouge().get_scores(hypothesis, target)[0]
        scores = {name: rouge[name]["f"] * 100 for name in METRICS[:3]}
    else:  # rouge_chinese would raise here; the record scores 0 and stays in the mean
        scores = {name: 0.0 for name in METRICS[:3]}
    scores["bleu-4"] = sentence_bleu([list(reference)], list(prediction), smoothing_function=_SMOOTHING) * 100
    return scores


def score(references: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict:
    """Corpus means of ROUGE-1/2/L F and BLEU-4 (x100), ``mean_length``, ``empty_rate``, ``n`` and ``per_record``
    (one dict per record: the four scores, ``length`` in characters and ``empty``)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no records to score")
    for i, (ref, pred) in enumerate(zip(references, predictions, strict=True)):
        several = isinstance(ref, list | tuple) and len(ref) > 0 and all(isinstance(r, str) for r in ref)
        if not (isinstance(ref, str) or several) or not isinstance(pred, str):
            raise TypeError(f"record {i}: the reference (or a non-empty list of them) and the prediction must be "
                            f"strings, got {type(ref).__name__} and {type(pred).__name__}")
    per_record = []
    for ref, pred in zip(references, predictions, strict=True):
        per_record.append({**record_scores(ref, pred), "length": len(pred), "empty": not pred.split()})
    n = len(per_record)
    summary = {name: sum(r[name] for r in per_record) / n for name in METRICS}
    summary["mean_length"] = sum(r["length"] for r in per_record) / n
    summary["empty_rate"] = sum(r["empty"] for r in per_record) / n
    return {**summary, "n": n, "per_record": per_record}


def format_summary(metrics: dict) -> str:
    """What predict prints."""
    scores = " / ".join(f"{metrics[name]:.2f}" for name in METRICS)
    return (f"records {metrics['n']}: ROUGE-1 / ROUGE-2 / ROUGE-L / BLEU-4 (x100): {scores}\n"
            f"mean generated length {metrics['mean_length']:.1f} characters; empty outputs {metrics['empty_rate']:.1%}")


def write_figures(metrics: dict, out_dir: Path) -> list[Path]:
    """Generation has no figure of its own."""
    return []
