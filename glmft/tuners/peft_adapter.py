"""Save and load for the tuners PEFT computes (lora, ia3): PEFT's own adapter format, checked on the way back in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict

from glmft.checkpoint import gathered, read_tensors, writing

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def save(model: PeftModel, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """adapter_config.json + adapter_model.safetensors, loadable by PEFT itself. ``state`` is the gathered trainable
    state (glmft.checkpoint.trainable_state): PEFT would otherwise read the parameters themselves, which under ZeRO-3
    are this rank's slice only."""
    with writing(directory / ADAPTER_FILE):
        model.save_pretrained(directory, state_dict=state)


def load(model: PeftModel, directory: Path, settings: tuple[str, ...], marker: str) -> None:
    """Load an adapter written by :func:`save` into a model built the same way: the config ``settings`` (a list
    setting compares as a set) must equal the built ones, and every tensor whose name holds ``marker`` must load."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    built = model.peft_config["default"]

    def as_set(value):
        return set(value) if isinstance(value, list | set | tuple) else value

    expected = {k: as_set(getattr(built, k)) for k in settings}
    found = {k: as_set(config.get(k)) for k in settings}
    if expected != found:
        raise ValueError(f"{directory / CONFIG_FILE}: adapter has {found}, the model was built with {expected}")
    state = read_tensors(directory / ADAPTER_FILE)
    adapters = [p for n, p in model.named_parameters() if marker in n]
    with gathered(adapters, modify=True):  # under ZeRO-3 each rank holds a slice: load into the whole tensors
        result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if marker in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory / ADAPTER_FILE} does not fit the model (missing {missing[:5]}, unexpected "
                         f"{list(result.unexpected_keys)[:5]})")
