"""Adapter (Houlsby et al., 2019): a bottleneck after the attention and after the MLP of every layer.

Each bottleneck maps the sublayer's output ``h`` to ``h + up(gelu(down(h)))`` before the layer's residual sum;
``up`` starts at zero, so a freshly applied adapter leaves the model's outputs exactly unchanged. PEFT has no
bottleneck-adapter method (its "adapters" are LoRA-like reparameterisations), so this is a small module of our own.
It is attached without touching the model file: the bottleneck becomes a child of the sublayer's output projection
(``...attention.dense.adapter``, ``...mlp.dense_4h_to_h.adapter``; stable names for trainable.safetensors) and a
forward hook adds it to that projection's output. It works position by position, so the KV cache is unaffected;
on an INT4/INT8 base it wraps the quantized projection the same way and stays in floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glmft import families
from glmft.args import opt
from glmft.tuners.base import enable, freeze_all

NAME = "adapter"
# Houlsby et al. swept {3e-5, 3e-4, 3e-3} per task; we take the middle of that grid for new modules that start at
# zero beside a large frozen base (tune it per task, as they did).
DEFAULT_LR = 3e-4


class Bottleneck(nn.Module):
    """down-projection -> GELU -> up-projection (zero at init); the hook adds the result to its input."""

    def __init__(self, hidden: int, size: int, like: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(size, hidden, device=like.device, dtype=like.dtype)
        if like.device.type != "meta":
            nn.init.normal_(self.down.weight, std=1e-2)  # near-identity start, as the paper initialises
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


def _add_adapter(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


@dataclass
class Args:
    adapter_size: int = opt(64, "bottleneck width of each adapter (two per layer)")

    def __post_init__(self) -> None:
        if self.adapter_size < 1:
            raise ValueError(f"--adapter_size must be at least 1, got {self.adapter_size}")


def describe(args: Args) -> str:
    return f"adapter (Houlsby bottleneck of {args.adapter_size} after attention and MLP of every layer)"


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    like = model.get_input_embeddings().weight  # the model's float dtype and device (meta for a dry run)
    hidden = model.config.hidden_size
    family = families.of_model(model)
    sites = family.adapter_sites(model)  # each block's attention and MLP output projections
    for layer in model.get_submodule(family.layers_path(model)):
        for site in sites:
            projection = layer.get_submodule(site)
            if hasattr(projection, "adapter"):
                raise ValueError(f"adapter: {site} already has an adapter; apply the method to a fresh model")
            projection.adapter = Bottleneck(hidden, args.adapter_size, like)
            projection.register_forward_hook(_add_adapter)
            enable(projection.adapter.parameters())
    return model
