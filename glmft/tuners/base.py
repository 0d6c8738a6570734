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


# The contract's optional hooks, with what they do for a method that needs none of them. glmft.tuners gives every
# tuner module these defaults, so the core calls the hooks directly on any method (never hasattr).


def model_overrides(args) -> dict:
    """Config fields the method needs when the model is built (P-Tuning's prefix length); none by default."""
    return {}


def on_step(model: nn.Module, step: int) -> None:
    """Called by the training loop at every accumulation boundary, after the last micro-batch's backward and before
    the optimizer step (``step``: the 1-based optimizer step about to be taken); nothing by default."""


def for_run(args, total_steps: int):
    """The method's options for a training run of ``total_steps`` optimizer steps (recorded in meta.json); unchanged
    by default."""
    return args


def state(model: nn.Module) -> dict:
    """What the method keeps between steps outside its parameters and the optimizer (AdaLoRA's importance scores),
    saved with each checkpoint's engine state for ``--resume``; nothing by default."""
    return {}


def load_state(model: nn.Module, saved: dict) -> None:
    """Put back what :func:`state` returned, when a run resumes; nothing by default."""


HOOKS = (model_overrides, on_step, for_run, state, load_state)
