"""LoRA through PEFT: low-rank adapters on the family's attention matrices (ChatGLM v1: query_key_value; any
--lora_target modules), the base frozen."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from chatglm.quantization import QuantizedLinear, is_quantized
from glmft import families
from glmft.args import opt
from glmft.tuners import peft_adapter
from glmft.tuners.base import freeze_all

NAME = "lora"
DEFAULT_LR = 2e-4


@dataclass
class Args:
    lora_r: int = opt(8, "rank of the low-rank update")
    lora_alpha: int = opt(32, "scaling numerator: the update is scaled by lora_alpha / lora_r")
    lora_dropout: float = opt(0.1, "dropout on the adapter's input")
    lora_target: str = opt("", "comma-separated module names to adapt (empty: the model family's default, "
                           "query_key_value on ChatGLM v1; e.g. query_key_value,dense,dense_h_to_4h,dense_4h_to_h)")

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target.strip() and not self.targets():
            raise ValueError("--lora_target names no module")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target.split(",") if t.strip()]


def describe(args: Args) -> str:
    where = args.lora_target or "the family's default targets"
    return f"lora (r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}, on {where})"


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.targets() or families.of_model(model).lora_targets(model), bias="none",
    )
    # PEFT's custom-module hook: on an INT4/INT8 base, a LoRA layer wraps our QuantizedLinear (the adapter stays
    # fp32 and adds its low-rank update to the dequantized matmul's output).
    config._register_custom_module({QuantizedLinear: LoraLinear})
    with warnings.catch_warnings():  # PEFT warns about any registered custom layer; this one is ours and tested
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        return get_peft_model(model, config)


def merge(model: PeftModel) -> nn.Module:
    """Fold the adapters into the base weights (same outputs, no adapter overhead at inference)."""
    if is_quantized(model):
        raise ValueError("LoRA cannot be merged into an INT4/INT8 base: the update would be rounded into the integer "
                         "grid and most of what the adapter learnt would be lost; keep the adapter unmerged")
    return model.merge_and_unload()


def save_weights(model: PeftModel, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The PEFT adapter format, from the gathered trainable state (whole tensors under ZeRO-3)."""
    peft_adapter.save(model, directory, state)


def load_weights(model: PeftModel, directory: Path) -> None:
    """Load an adapter saved by save_weights into a model built by apply(); its settings and tensors must match."""
    peft_adapter.load(model, directory, ("r", "target_modules"), "lora_")
