"""(IA)^3 through PEFT: learnt vectors that rescale the attention's query/key/value and the MLP's inner activations.

The targets are the model family's (glmft.families): PEFT's defaults for the model type where it has them; for
ChatGLM v1, which PEFT has none for, its defaults for BLOOM, which shares the module names: ``query_key_value`` (its
output is scaled, 3 * hidden values per layer) and ``dense_4h_to_h`` as the feed-forward module (its input is scaled,
inner_hidden_size values per layer). The vectors start at one, so a freshly applied
(IA)^3 leaves the model's outputs unchanged. Checkpoints are PEFT adapters, loadable by PEFT itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import IA3Config, PeftModel, TaskType, get_peft_model
from torch import nn

from chatglm.quantization import is_quantized
from glmft import families
from glmft.args import opt
from glmft.tuners import peft_adapter
from glmft.tuners.base import freeze_all

NAME = "ia3"
DEFAULT_LR = 3e-3  # the (IA)^3 paper's learning rate (T-Few); the vectors are few and start at one


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class Args:
    ia3_target: str = opt("", "comma-separated module names whose activations are rescaled (empty: the model "
                          "family's default, query_key_value,dense_4h_to_h on ChatGLM v1)")
    ia3_feedforward: str = opt("", "which of --ia3_target are feed-forward modules (their input is scaled rather "
                               "than their output; empty: the family's default among the targets)")

    def __post_init__(self) -> None:
        if self.ia3_target.strip() and not _names(self.ia3_target):
            raise ValueError("--ia3_target names no module")
        extra = set(_names(self.ia3_feedforward)) - set(_names(self.ia3_target))
        if self.ia3_feedforward.strip() and not self.ia3_target.strip():
            raise ValueError("--ia3_feedforward needs --ia3_target (the modules it picks from)")
        if self.ia3_target.strip() and extra:
            raise ValueError(f"--ia3_feedforward names {sorted(extra)}, which are not in --ia3_target")


def describe(args: Args) -> str:
    if not args.ia3_target:
        return "ia3 (rescaling vectors on the family's default targets)"
    return f"ia3 (rescaling vectors on {args.ia3_target}; feed-forward: {args.ia3_feedforward or 'default'})"


def targets(model: nn.Module, args: Args) -> tuple[list[str], list[str]]:
    """(targets, feed-forward modules): the options', else the family's; feed-forward ones among the targets."""
    default_targets, default_ff = families.of_model(model).ia3_targets(model)
    chosen = _names(args.ia3_target) or default_targets
    feedforward = _names(args.ia3_feedforward) or [m for m in default_ff if m in chosen]
    return chosen, feedforward


def apply(model: nn.Module, args: Args) -> nn.Module:
    if is_quantized(model):
        # PEFT's (IA)^3 wraps only nn.Linear (and bitsandbytes) layers and, unlike LoRA, has no custom-module hook.
        raise ValueError("ia3 does not support an INT4/INT8 base yet: use a float base model, or lora / bitfit")
    freeze_all(model)
    chosen, feedforward = targets(model, args)
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=chosen, feedforward_modules=feedforward)
    return get_peft_model(model, config)


def save_weights(model: PeftModel, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The PEFT adapter format, from the gathered trainable state (whole tensors under ZeRO-3)."""
    peft_adapter.save(model, directory, state)


def load_weights(model: PeftModel, directory: Path) -> None:
    """Load an adapter saved by save_weights into a model built by apply(); its settings and tensors must match."""
    peft_adapter.load(model, directory, ("target_modules", "feedforward_modules"), "ia3_")
