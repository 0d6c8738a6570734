"""LoRA through PEFT: low-rank adapters on query_key_value (or any --lora_target modules), the base frozen."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from chatglm.quantization import QuantizedLinear, is_quantized
from glmft.args import opt
from glmft.checkpoint import gathered, read_tensors, writing
from glmft.tuners.base import freeze_all

NAME = "lora"
DEFAULT_LR = 2e-4
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class Args:
    lora_r: int = opt(8, "rank of the low-rank update")
    lora_alpha: int = opt(32, "scaling numerator: the update is scaled by lora_alpha / lora_r")
    lora_dropout: float = opt(0.1, "dropout on the adapter's input")
    lora_target: str = opt("query_key_value", "comma-separated module names to adapt (e.g. "
                           "query_key_value,dense,dense_h_to_4h,dense_4h_to_h)")

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.targets():
            raise ValueError("--lora_target names no module")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target.split(",") if t.strip()]


def describe(args: Args) -> str:
    return f"lora (r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}, on {args.lora_target})"


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.targets(), bias="none",
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
    """The PEFT adapter format (adapter_config.json + adapter_model.safetensors), loadable by PEFT itself.

    ``state`` is the gathered trainable state (glmft.checkpoint.trainable_state): PEFT would otherwise read the
    parameters themselves, which under ZeRO-3 are this rank's slice only.
    """
    with writing(directory / ADAPTER_FILE):
        model.save_pretrained(directory, state_dict=state)


def load_weights(model: PeftModel, directory: Path) -> None:
    """Load an adapter saved by save_weights into a model built by apply(); every adapter tensor must match."""
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    expected = {"r": model.peft_config["default"].r, "target_modules": set(model.peft_config["default"].target_modules)}
    found = {"r": config["r"], "target_modules": set(config["target_modules"])}
    if expected != found:
        raise ValueError(f"{directory}: adapter has {found}, the model was built with {expected}")
    state = read_tensors(Path(directory) / ADAPTER_FILE)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    with gathered(adapters, modify=True):  # under ZeRO-3 each rank holds a slice: load into the whole tensors
        result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: adapter does not fit the model (missing {missing[:5]}, unexpected "
                         f"{list(result.unexpected_keys)[:5]})")
