"""What every tuner does first: freeze the whole model, then enable exactly its own parameters."""

from __future__ import annotations

from torch import nn


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def enable(params) -> int:
    """Make these parameters trainable; returns how many elements that is.

    Dtypes are left alone: the engine trains in its precision and keeps fp32 master weights for fp16/bf16
    (DeepSpeed), and PEFT keeps LoRA adapters in fp32 itself.
    """
    count = 0
    for p in params:
        p.requires_grad_(True)
        count += p.numel()
    return count
