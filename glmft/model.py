"""Load the tokenizer and the model (dtype, config overrides, meta device for dry runs) and count parameters."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from chatglm import resolve_model_dir
from glmft import families

_LAYER = re.compile(r"\.(layers|h|blocks)\.(\d+)\.")  # a transformer block's index in a parameter name
_GROUPED = re.compile(r"\.(layers|h|blocks)\.\*\.")


def model_path(model_dir: str | Path) -> Path:
    """A model directory, 'tiny'/'mini', or (for dry runs) the path of a config.json."""
    path = Path(model_dir)
    return resolve_model_dir(path.parent if path.name == "config.json" and path.is_file() else model_dir)


def family(model_dir: str | Path):
    """The model family (glmft.families) of a model directory, from its config.json."""
    return families.of_dir(model_path(model_dir))


def load_tokenizer(model_dir: str | Path):
    path = model_path(model_dir)
    return families.of_dir(path).load_tokenizer(path)


def build_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, overrides: dict | None = None,
                meta: bool = False) -> nn.Module:
    """The model with its weights, or (``meta=True``) only its shapes, built from config.json without any weight."""
    path = model_path(model_dir)
    return families.of_dir(path).build_model(path, dtype, overrides or {}, meta)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all); a tied tensor counts once, as the seeds' reports count it."""
    params = list(model.parameters())  # parameters() yields each shared tensor once
    return sum(full_numel(p) for p in params if p.requires_grad), sum(full_numel(p) for p in params)


def full_numel(p: torch.Tensor) -> int:
    """A parameter's full size, also under ZeRO-3, where each rank holds only a slice (its ``numel()`` is 0)."""
    return getattr(p, "ds_numel", None) or p.numel()


def summary_line(model: nn.Module) -> str:
    """The seeds' report line: ``trainable params: 3,670,016 || all params: 6,176,956,416 || trainable%: 0.0594``."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def _layer_span(layers: list[int]) -> str:
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"[{layers[0]}-{layers[-1]}]" if len(layers) > 1 else f"[{layers[0]}]"
    return "[" + ",".join(map(str, layers)) + "]"


def parameter_report(model: nn.Module) -> str:
    """The summary line and what trains, grouped across layers (one row per kind of tensor)."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = _LAYER.sub(lambda m: f".{m.group(1)}.*.", name)
            entry = groups.setdefault(key, [0, 0, []])
            entry[0] += 1
            entry[1] += full_numel(p)
            if (m := _LAYER.search(name)) is not None:
                entry[2].append(int(m.group(2)))
    trainable, total = count_parameters(model)
    rows = [summary_line(model), f"  ({trainable / 1e9:.3f}B trainable of {total / 1e9:.3f}B)", "what trains:"]
    width = max((len(k) for k in groups), default=0) + 8
    for key, (n, numel, layers) in groups.items():
        span = _layer_span(layers) if layers else ""
        name = _GROUPED.sub(lambda m, s=span: f".{m.group(1)}.{s}.", key, count=1) if layers else key
        per = f"{n} x {numel // n:,} = " if n > 1 else ""
        rows.append(f"  {name:<{width}} {per}{numel:,}")
    return "\n".join(rows)
