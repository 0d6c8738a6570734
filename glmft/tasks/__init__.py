"""Tasks, one module each, looked up by name (the same name everywhere: ``--task``, meta.json, metrics.json, the
report). Every task module follows the contract in ``glmft.tasks.base``."""

from __future__ import annotations

import types
from collections.abc import Sequence

from glmft.tasks import classification, generation, triples
from glmft.tasks.base import Layout

TASKS: dict[str, types.ModuleType] = {m.NAME: m for m in (triples, generation, classification)}
DEFAULT = triples.NAME  # what a run without --task does, and what a checkpoint without a task in meta.json learned


def get(name: str) -> types.ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def layouts(name: str, input_key: str = "", target_key: str = "") -> tuple[Layout, ...]:
    """The record layouts a run reads: the task's, or the one ``--input_key/--target_key`` name."""
    if bool(input_key) != bool(target_key):
        raise ValueError(f"--input_key ({input_key!r}) and --target_key ({target_key!r}) go together: give both")
    return (Layout((input_key,), target_key),) if input_key else get(name).LAYOUTS


def score(task: types.ModuleType, golds: Sequence, preds: Sequence[str], labels: Sequence[str] | None = None) -> dict:
    """``task.score`` with the label set where the task uses one (the one call for predict and evaluation)."""
    if task.USES_LABELS:
        if not labels:
            raise ValueError(f"the {task.NAME} task needs a label set")
        return task.score(golds, preds, labels=labels)
    return task.score(golds, preds)
