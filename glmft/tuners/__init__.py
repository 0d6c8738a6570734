"""Fine-tuning methods, one module each, looked up by name (the same name everywhere: scripts, meta.json, logs).

Every tuner module exposes ``NAME``, ``DEFAULT_LR``, an ``Args`` dataclass, ``describe(args) -> str`` and
``apply(model, args) -> model`` (freeze everything, then enable exactly its own parameters). The optional hooks
(glmft.tuners.base, whose defaults every module gets here): ``model_overrides(args)`` (config fields needed when the
model is built: P-Tuning v2), ``for_run(args, total_steps)`` (options that depend on the run: AdaLoRA's schedule),
``on_step(model, step)`` (between the last backward of a step and the optimizer step: AdaLoRA's budget) and
``state(model)`` / ``load_state(model, saved)`` (running state saved for ``--resume``). LoRA adds ``merge(model)``;
the PEFT-adapter methods (lora, ia3, adalora) their own ``save_weights``/``load_weights`` (PEFT's format).
Adding a method is its module plus one entry in ``TUNERS``.
"""

from __future__ import annotations

import types

from glmft.tuners import (
    adalora,
    adapter,
    base,
    bitfit,
    embedding,
    freeze,
    full,
    ia3,
    lora,
    p_tuning,
    prompt_tuning,
    pt,
)

TUNERS: dict[str, types.ModuleType] = {m.NAME: m for m in (freeze, embedding, pt, lora, bitfit, ia3, adapter, full,
                                                                  prompt_tuning, p_tuning, adalora)}
for _module in TUNERS.values():  # the contract's hooks a method does not define: base's defaults
    for _hook in base.HOOKS:
        vars(_module).setdefault(_hook.__name__, _hook)


def get(name: str) -> types.ModuleType:
    if name not in TUNERS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(TUNERS)}")
    return TUNERS[name]
