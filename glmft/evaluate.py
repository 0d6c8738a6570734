"""Evaluation while training (``--eval_path``): the mean loss per supervised token of the eval records and, with
``--eval_metric_samples N``, the task's headline metric on greedy answers to the first N of them.

Every rank takes a shard (records rank, rank + world, ...) and runs as many forward passes as every other rank (a
rank whose shard ran out runs a zero-weight filler batch): under ZeRO-3 each forward gathers the parameters with a
collective, so a rank that stopped early would leave the others waiting. The sums (loss x tokens, tokens) meet in one
all_reduce on the engine's device and the host reads them once per evaluation. Generation runs with ``synced_gpus``
under ZeRO-3 for the same reason; the answers are gathered on every rank, so every rank scores the same metric and
takes the same decision to save (saving is collective).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from transformers import LogitsProcessorList

from chatglm.modeling_chatglm import SafeScoresProcessor
from glmft import families, tasks
from glmft.data import IGNORE_INDEX, DataError, collate, record_prompt_ids

LOSS = "eval/loss"


def world() -> tuple[int, int]:
    """(rank, world size); one rank without a process group (tests, predict)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank_batches(items: Sequence, rank: int, size: int, batch_size: int) -> Iterator[tuple[list, bool]]:
    """This rank's batches of ``items`` and whether each is real: every rank gets the same number of batches
    (``ceil(ceil(n / size) / batch_size)``); where this rank's shard has run out, a filler batch (the first item)."""
    mine = [items[i] for i in range(rank, len(items), size)]
    for k in range(math.ceil(math.ceil(len(items) / size) / batch_size)):
        chunk = mine[k * batch_size : (k + 1) * batch_size]
        yield (chunk, True) if chunk else ([items[0]], False)


@torch.no_grad()
def eval_loss(model, examples: Sequence[dict], batch_size: int, pad_token_id: int, device: torch.device,
              extra: dict | None = None) -> float:
    """Mean negative log-likelihood per supervised token over ``examples`` (encoded as for training), all ranks.
    ``extra``: the model family's forward arguments with labels (glmft.families, ``LOSS_KWARGS``)."""
    rank, size = world()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
    extra = extra or {}
    for chunk, real in rank_batches(examples, rank, size, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
        loss = model(**batch, **extra).loss  # the mean over the tokens the model shifts its labels onto
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()
        total += torch.stack((loss.double() * tokens, tokens)) * float(real)
    if size > 1:
        dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    return loss_sum / tokens


@torch.no_grad()
def greedy(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, device: torch.device,
           batch_size: int = 8, synced_gpus: bool = False) -> list[list[int]]:
    """Greedy answers (new token ids up to and including the first <eop>) to prompts laid out as
    :func:`glmft.data.record_prompt_ids` lays them out; left padded in batches, with the KV cache."""
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer.pad({"input_ids": list(prompts[start : start + batch_size])}, return_tensors="pt")
        batch = batch.to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             logits_processor=LogitsProcessorList([SafeScoresProcessor(tokenizer)]),
                             synced_gpus=synced_gpus)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            answers.append(row[:end])
    return answers


def sharded_answers(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                    device: torch.device, synced_gpus: bool) -> list[str]:
    """Decoded greedy answers to every prompt, each rank generating its shard; every rank gets all of them."""
    rank, size = world()
    mine: list[tuple[int, str]] = []
    for chunk, real in rank_batches(list(enumerate(prompts)), rank, size, batch_size):
        ids = greedy(model, tokenizer, [p for _, p in chunk], max_new_tokens, device, batch_size, synced_gpus)
        if real:
            mine += [(i, tokenizer.decode(a, skip_special_tokens=True).strip())
                     for (i, _), a in zip(chunk, ids, strict=True)]
    parts: list = [mine]
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, mine)
    found = dict(pair for part in parts for pair in part)
    return [found[i] for i in range(len(prompts))]


class Evaluator:
    """When to evaluate, what the best evaluation so far was, and what a checkpoint records of it.

    ``measure()`` returns the scalars of one evaluation (``eval/loss``, and ``eval/<headline>`` with a metric);
    ``criterion`` is the one a checkpoint is judged by (eval loss, lower is better, or the headline, higher)."""

    def __init__(self, measure: Callable[[], dict[str, float]], every: int, criterion: str, higher: bool,
                 save_best: bool, history: Sequence[dict] = ()):
        self.measure, self.every, self.save_best = measure, every, save_best
        self.by = {"name": criterion, "higher_is_better": higher}
        self.best: float | None = None
        self.last: dict[str, float] = {}
        self.improved = False
        for point in history:  # a resumed run: the best of its earlier segments
            self.track(point)
        self.improved = False

    def due(self, step: int, saving: bool) -> bool:
        """Every ``every`` steps, and at every checkpoint (so that each one records its own weights' values)."""
        return saving or bool(self.every and step % self.every == 0)

    def track(self, scalars: dict[str, float]) -> None:
        value = scalars.get(self.by["name"])
        if value is None or not math.isfinite(value):
            self.improved = False
            return
        sign = -1.0 if self.by["higher_is_better"] else 1.0
        self.improved = self.best is None or sign * value < sign * self.best
        if self.improved:
            self.best = value

    def __call__(self) -> dict[str, float]:
        self.last = self.measure()
        self.track(self.last)
        return self.last

    def save_now(self) -> bool:
        """With --save_best, every evaluation that improved on the best so far is checkpointed."""
        return self.save_best and self.improved

    def fields(self) -> dict:
        """What the checkpoint of this step records in meta.json: its eval values and the criterion it is kept by."""
        return {"eval": dict(self.last), "best_by": dict(self.by)}


def task_of(train) -> types.ModuleType | None:
    """The task whose headline metric --eval_metric_samples scores (None: loss only)."""
    return tasks.get(train.task) if train.eval_metric_samples else None


def build(engine, train, data: tuple, tokenizer, task: types.ModuleType | None,
          history: Sequence[dict] = ()) -> Evaluator:
    """The Evaluator of a training run. ``data``: the (training, eval) datasets; ``task`` scores greedy answers to
    the first ``train.eval_metric_samples`` eval records against the label set of both files (None: loss only);
    ``history``: a resumed run's earlier evaluations."""
    train_set, eval_set = data
    records = eval_set.records[: train.eval_metric_samples]
    prompts = [record_prompt_ids(r, tokenizer, train.max_src_len) for r in records]
    golds = [r.target for r in records]
    # the run's label set (--labels, labels.json or the training labels, resolved in TrainArgs); else every target
    labels = list(train.labels or sorted({r.target for r in (*train_set.records, *eval_set.records)}))
    if task is not None and task.USES_LABELS:  # an eval gold outside the set would stop the run at its first eval
        for r in records:
            if r.target not in labels:
                raise DataError(f"{r.path}:{r.line}: label {r.target!r} is not in the run's label set {labels}")
    synced = engine.zero_optimization_stage() == 3 and world()[1] > 1

    def measure() -> dict[str, float]:
        module = engine.module
        was_training = module.training
        module.eval()  # dropout off; restored below, whatever happens
        try:
            scalars = {LOSS: eval_loss(module, eval_set.examples, train.eval_batch_size, tokenizer.pad_token_id,
                                       engine.device, families.of_tokenizer(tokenizer).LOSS_KWARGS)}
            if task is not None:
                preds = sharded_answers(module, tokenizer, prompts, train.max_len - train.max_src_len,
                                        train.eval_batch_size, engine.device, synced)
                scalars[f"eval/{task.HEADLINE}"] = float(tasks.score(task, golds, preds, labels)[task.HEADLINE])
        finally:
            module.train(was_training)
        return scalars

    metric = train.save_best == "metric"
    criterion = f"eval/{task.HEADLINE}" if metric else LOSS
    return Evaluator(measure, train.eval_steps, criterion, metric, bool(train.save_best), history)
