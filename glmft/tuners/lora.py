"""LoRA through PEFT: low-rank adapters on the family's attention matrices (ChatGLM v1: query_key_value; any
--lora_target modules), the base frozen."""

from __future__ import annotations

import re
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


REGEX_CHARACTERS = set("*+?[]()|^$\\")  # a --lora_target with any of these is a regular expression


@dataclass
class Args:
    lora_r: int = opt(8, "rank of the low-rank update")
    lora_alpha: int = opt(32, "scaling numerator: the update is scaled by lora_alpha / lora_r (by lora_alpha / "
                          "sqrt(lora_r) with --use_rslora)")
    lora_dropout: float = opt(0.1, "dropout on the adapter's input")
    lora_target: str = opt("", "modules to adapt: comma-separated names (empty: the model family's default, "
                           "query_key_value on ChatGLM v1; e.g. query_key_value,dense,dense_h_to_4h,dense_4h_to_h), or "
                           "a regular expression matching whole module names (e.g. '.*\\.1.*query_key_value')")
    modules_to_save: str = opt("", "comma-separated modules trained whole beside the adapters (e.g. word_embeddings)")
    use_dora: bool = opt(False, "DoRA: a trained magnitude per output row, the low-rank update on the direction")
    use_rslora: bool = opt(False, "rank-stabilised scaling lora_alpha / sqrt(lora_r)")
    lora_layers: str = opt("", "comma-separated layer indices to adapt (empty: every layer)")

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target.strip() and not self.targets():
            raise ValueError("--lora_target names no module")
        if self.is_regex():
            try:
                re.compile(self.lora_target)
            except re.error as err:
                raise ValueError(f"--lora_target {self.lora_target!r} is not a regular expression: {err}") from None
        try:
            self.layers()
        except ValueError:
            raise ValueError(f"--lora_layers must be comma-separated integers, got {self.lora_layers!r}") from None

    def is_regex(self) -> bool:
        return bool(REGEX_CHARACTERS & set(self.lora_target))

    def targets(self) -> list[str] | str:
        """A list of names (PEFT matches each as a module-name suffix) or one regular expression (PEFT matches it
        against the whole name)."""
        if self.is_regex():
            return self.lora_target.strip()
        return [t.strip() for t in self.lora_target.split(",") if t.strip()]

    def layers(self) -> list[int] | None:
        return [int(x) for x in self.lora_layers.split(",") if x.strip()] or None

    def saved_modules(self) -> list[str] | None:
        return [m.strip() for m in self.modules_to_save.split(",") if m.strip()] or None


def describe(args: Args) -> str:
    where = args.lora_target or "the family's default targets"
    extras = [f"layers {args.lora_layers}" if args.lora_layers else "", "DoRA" if args.use_dora else "",
              "rsLoRA" if args.use_rslora else "", f"and {args.modules_to_save} whole" if args.modules_to_save else ""]
    extra = ", ".join(e for e in extras if e)
    return (f"lora (r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}, on {where}"
            + (f", {extra}" if extra else "") + ")")


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.targets() or families.of_model(model).lora_targets(model), bias="none",
        modules_to_save=args.saved_modules(), use_dora=args.use_dora, use_rslora=args.use_rslora,
        layers_to_transform=args.layers(),
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
    peft_adapter.load(model, directory, ("r", "target_modules", "use_dora", "use_rslora", "modules_to_save",
                                         "layers_to_transform"), "lora_")
