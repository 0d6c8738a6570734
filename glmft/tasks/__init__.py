"""Tasks, one module each, looked up by name (the same name everywhere: scripts, meta.json, reports).

Every task module exposes ``NAME``, ``HEADLINE`` (the key of its headline metric in ``score``'s result) and
``score(...) -> dict`` (corpus summary plus per-record scores). ``triples`` joins this table when the Task layer
is wired in (issue 12); until then its scorer stays in ``glmft.metrics``.
"""

from __future__ import annotations

import types

from glmft.tasks import classification, generation

TASKS: dict[str, types.ModuleType] = {m.NAME: m for m in (generation, classification)}


def get(name: str) -> types.ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
