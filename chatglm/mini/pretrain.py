"""The mini model's pretraining loop: plain PyTorch AdamW on the CPU, seeded, one example stream per seed.

Kept apart from ``glmft`` on purpose: fine-tuning is glmft's job (DeepSpeed, checkpoints, tuners); building the base
model is a one-off that needs none of that and must give the same bytes on every run (fixed thread count, one
``random.Random`` for the example stream, one torch seed for the initialisation).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from chatglm.mini.objectives import IGNORE, Examples


@dataclass
class Schedule:
    """``steps`` is the length the learning-rate curve is laid out for; training stops after ``stop`` of them (0:
    all). A run stopped early is then bit for bit the same as the longer run at that step."""

    steps: int = 3000
    stop: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine down to ``min_lr_ratio * lr``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    @property
    def trained(self) -> int:
        return self.stop or self.steps


class Stream:
    """Batches of examples: sources drawn by weight, a text uniformly within its source, length-bucketed batches
    (a pool of 8 batches sorted by length, then shuffled) so little compute goes to padding."""

    def __init__(self, texts: dict[str, list[str]], weights: dict[str, float], examples: Examples, seed: int,
                 batch_size: int, prompted: str = "") -> None:
        self.texts, self.examples, self.batch_size, self.prompted = texts, examples, batch_size, prompted
        self.names = [n for n in texts if weights.get(n, 0) > 0]
        self.weights = [weights[n] for n in self.names]
        self.rng = random.Random(seed)
        self.ready: list[list[tuple[list[int], list[int]]]] = []

    def _refill(self) -> None:
        pool = []
        for _ in range(8 * self.batch_size):
            name = self.rng.choices(self.names, weights=self.weights)[0]
            text = self.texts[name][self.rng.randrange(len(self.texts[name]))]
            pool.append(self.examples.draw(text, self.rng, with_prompt=name == self.prompted))
        pool.sort(key=lambda pair: len(pair[0]))
        batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        self.rng.shuffle(batches)
        self.ready = batches

    def next(self, pad_id: int) -> dict[str, torch.Tensor]:
        if not self.ready:
            self._refill()
        batch = self.ready.pop()
        width = max(len(ids) for ids, _ in batch)
        ids = [x + [pad_id] * (width - len(x)) for x, _ in batch]
        labels = [y + [IGNORE] * (width - len(y)) for _, y in batch]
        mask = [[1] * len(x) + [0] * (width - len(x)) for x, _ in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, layernorms or the embedding, which is also the output layer)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "word_embeddings" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def pretrain(model: torch.nn.Module, stream: Stream, schedule: Schedule, pad_id: int, log_every: int = 50,
             on_step: Callable[[int], None] | None = None) -> list[tuple[int, float]]:
    """Train ``model`` in place; returns the logged curve [(step, mean loss since the previous point)]."""
    model.train()
    optimizer = torch.optim.AdamW(_decay_groups(model, schedule.weight_decay), lr=schedule.lr, betas=(0.9, 0.95))
    curve, window = [], []
    bar = tqdm(range(schedule.trained), desc="pretraining mini", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss = model(**stream.next(pad_id), logits_to_keep=1).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == schedule.trained:
            curve.append((step + 1, round(sum(window) / len(window), 3)))  # as the progress bar shows it
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            window = []
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return curve
