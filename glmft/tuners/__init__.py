"""Fine-tuning methods, one module each, looked up by name (the same name everywhere: scripts, meta.json, logs).

Every tuner module exposes ``NAME``, ``DEFAULT_LR``, an ``Args`` dataclass, ``describe(args) -> str`` and
``apply(model, args) -> model`` (freeze everything, then enable exactly its own parameters); P-Tuning adds
``model_overrides(args)`` (config fields needed when the model is built), LoRA adds ``merge(model)`` and its own
adapter save/load, as (IA)^3 does (PEFT's adapter format).
"""

from __future__ import annotations

import types

from glmft.tuners import adapter, bitfit, embedding, freeze, full, ia3, lora, pt

TUNERS: dict[str, types.ModuleType] = {m.NAME: m for m in (freeze, embedding, pt, lora, bitfit, ia3, adapter, full)}


def get(name: str) -> types.ModuleType:
    if name not in TUNERS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(TUNERS)}")
    return TUNERS[name]
