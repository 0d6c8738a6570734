"""The Task contract: what every module in ``glmft/tasks/`` exposes, so the core never asks which task it runs.

A task is a module (looked up by name in ``glmft.tasks.TASKS``) with:

* ``NAME``: the same string everywhere (``--task``, ``meta.json``, ``metrics.json``, the report).
* ``DEFAULT_PROMPT``: put before a record's input when the record carries no instruction of its own.
* ``LAYOUTS``: the record layouts it reads, as :class:`Layout` (input keys, target key), detected line by line;
  ``--input_key/--target_key`` replace them with one layout of the user's names.
* ``USES_LABELS``: the scorer needs the label set (``score(..., labels=...)``); ``MULTI_REFERENCE``: a test record's
  target may be a list of strings (several references; training records still need one string).
* ``score(golds, preds, **kw) -> dict``: the corpus summary plus ``per_record`` (one dict per record, written to
  predictions.jsonl); ``record_scores(gold, pred, ...)``: one record's scores.
* ``HEADLINE``: the key of the headline metric in ``score``'s result (higher is better).
* ``COLUMNS``: the report's task columns, ``(metrics key, header, kind)`` (kinds: glmft.report's formats); the
  headline's own entry names the seeds' column ``测试结果<header>`` and the plot ``<header>_vs_memory.png``.
* ``format_summary(metrics) -> str``: what predict prints; ``write_figures(metrics, out_dir) -> list[Path]``: extra
  files beside metrics.json (the confusion matrix PNG; ``[]`` for most tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol


class Layout(NamedTuple):
    """Which fields of a JSON record hold the input and the target.

    The input is the input fields' values joined in order. With one input field the task's prompt goes before it;
    with several (``{instruction, input, output}``) the first carries the instruction, so no prompt is added."""

    input_keys: tuple[str, ...]
    target_key: str

    def keys(self) -> tuple[str, ...]:
        return (*self.input_keys, self.target_key)

    def text(self) -> str:
        return "{" + ", ".join(self.keys()) + "}"


INSTRUCTION = Layout(("instruction", "input"), "output")  # the seeds' instruction files (and Alpaca-style data)


class Task(Protocol):
    """Static description of the module contract above (modules satisfy it structurally)."""

    NAME: str
    DEFAULT_PROMPT: str
    LAYOUTS: tuple[Layout, ...]
    USES_LABELS: bool
    MULTI_REFERENCE: bool
    HEADLINE: str
    COLUMNS: tuple[tuple[str, str, str], ...]

    def score(self, golds: Sequence[Any], preds: Sequence[str], **kwargs: Any) -> dict: ...

    def record_scores(self, gold: Any, pred: str, *args: Any) -> dict: ...

    def format_summary(self, metrics: dict) -> str: ...

    def write_figures(self, metrics: dict, out_dir: Path) -> list[Path]: ...
