"""(IA)^3 through PEFT: learnt vectors that rescale the attention's query/key/value and the MLP's inner activations.

PEFT has no (IA)^3 defaults for ChatGLM, so the targets follow its defaults for BLOOM, which shares the module names:
``query_key_value`` (its output is scaled, 3 * hidden values per layer) and ``dense_4h_to_h`` as the feed-forward
module (its input is scaled, inner_hidden_size values per layer). The vectors start at one, so a freshly applied
(IA)^3 leaves the model's outputs unchanged. Checkpoints are PEFT adapters, loadable by PEFT itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import IA3Config, PeftModel, TaskType, get_peft_model
from torch import nn

from chatglm.quantization import is_quantized
from glmft.args import opt
from glmft.tuners import peft_adapter
from glmft.tuners.base import freeze_all

NAME = "ia3"
DEFAULT_LR = 3e-3  # the (IA)^3 paper's learning rate (T-Few); the vectors are few and start at one
TARGETS = "query_key_value,dense_4h_to_h"  # ChatGLM v1's module names, kept here only
FEEDFORWARD = "dense_4h_to_h"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class Args:
    ia3_target: str = opt(TARGETS, "comma-separated module names whose activations are rescaled")
    ia3_feedforward: str = opt(FEEDFORWARD, "which of --ia3_target are feed-forward modules (their input is scaled "
                               "rather than their output)")

    def __post_init__(self) -> None:
        if not _names(self.ia3_target):
            raise ValueError("--ia3_target names no module")
        extra = set(_names(self.ia3_feedforward)) - set(_names(self.ia3_target))
        if extra:
            raise ValueError(f"--ia3_feedforward names {sorted(extra)}, which are not in --ia3_target")


def describe(args: Args) -> str:
    return f"ia3 (rescaling vectors on {args.ia3_target}; feed-forward: {args.ia3_feedforward or 'none'})"


def apply(model: nn.Module, args: Args) -> nn.Module:
    if is_quantized(model):
        # PEFT's (IA)^3 wraps only nn.Linear (and bitsandbytes) layers and, unlike LoRA, has no custom-module hook.
        raise ValueError("ia3 does not support an INT4/INT8 base yet: use a float base model, or lora / bitfit")
    freeze_all(model)
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=_names(args.ia3_target),
                       feedforward_modules=_names(args.ia3_feedforward))
    return get_peft_model(model, config)


def save_weights(model: PeftModel, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The PEFT adapter format, from the gathered trainable state (whole tensors under ZeRO-3)."""
    peft_adapter.save(model, directory, state)


def load_weights(model: PeftModel, directory: Path) -> None:
    """Load an adapter saved by save_weights into a model built by apply(); its settings and tensors must match."""
    peft_adapter.load(model, directory, ("target_modules", "feedforward_modules"), "ia3_")
