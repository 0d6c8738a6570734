"""Checkpoints that describe themselves: the trainable weights (safetensors) plus ``meta.json``.

A checkpoint directory ``<output_dir>/checkpoint-<step>/`` holds
- the method's weights: ``trainable.safetensors`` (every ``requires_grad`` tensor under its model name: the trained
  layers, the embedding, or ``transformer.prefix_encoder.*`` with the original key names), or for LoRA the PEFT
  adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``meta.json``: method, its arguments, the data/length arguments, the base model and the step, so prediction never
  asks the user to re-type a setting;
- ``engine/`` (training runs only): DeepSpeed's optimizer, scheduler and trainable-module state, for ``--resume``.
It is written under a temporary name and renamed when complete, so a killed run never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

META_FILE = "meta.json"
WEIGHTS_FILE = "trainable.safetensors"
_NAME = re.compile(r"checkpoint-(\d+)")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def write_weights(model: nn.Module, directory: Path, tuner: types.ModuleType) -> None:
    if hasattr(tuner, "save_weights"):
        tuner.save_weights(model, directory)
    else:
        save_file(trainable_state(model), directory / WEIGHTS_FILE, metadata={"format": "pt"})


def write_meta(directory: Path, meta: dict) -> None:
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is assembled before :func:`publish` renames it into place."""
    return Path(output_dir) / f".checkpoint-{step}.partial"


def publish(staging: Path) -> Path:
    """Rename a complete staging directory to its final name (replacing an older one of the same step)."""
    final = staging.with_name(staging.name.removeprefix(".").removesuffix(".partial"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def save(model: nn.Module, directory: Path, meta: dict, tuner: types.ModuleType) -> Path:
    """Write weights + meta.json atomically to ``directory`` (a single-process save, used outside training)."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_weights(model, staging, tuner)
    write_meta(staging, meta)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint of this project: it has no {META_FILE}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_weights(model: nn.Module, directory: str | Path, tuner: types.ModuleType) -> None:
    """Load a checkpoint's weights into a model prepared the same way (built with the overrides, tuner applied).

    Every trainable tensor of the model must be in the file with its shape, and the file must hold nothing else.
    """
    directory = Path(directory)
    if hasattr(tuner, "load_weights"):
        tuner.load_weights(model, directory)
        return
    state = load_file(directory / WEIGHTS_FILE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(params[n].shape)}" for n in params.keys() & state.keys()
             if state[n].shape != params[n].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not fit the model: missing {missing}, unexpected "
                         f"{unexpected}, wrong shape {wrong}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def latest(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir`` (partial ones are never picked)."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := _NAME.fullmatch(p.name)) and (p / META_FILE).is_file()]
    return max(found)[1] if found else None
