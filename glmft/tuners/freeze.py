"""Freeze: train the last N transformer layers (or an explicit list), everything else frozen."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from chatglm.quantization import quantized_parameter_names
from glmft import families
from glmft.args import opt
from glmft.tuners.base import enable, freeze_all

NAME = "freeze"
DEFAULT_LR = 1e-5
PARTS = ("all", "mlp", "attention")  # what each means in a model: its family's parts()


@dataclass
class Args:
    num_trainable_layers: int = opt(5, "train the last N transformer layers (5: layers 23-27 of chatglm-6b's 28)")
    trainable_layers: str = opt("", "explicit comma-separated layer indices to train, e.g. 23,24,25 (overrides "
                                "--num_trainable_layers)")
    trainable_part: str = opt("all", "which part of each chosen layer trains: all, mlp or attention")

    def __post_init__(self) -> None:
        if self.trainable_part not in PARTS:
            raise ValueError(f"--trainable_part must be one of {', '.join(PARTS)}, got {self.trainable_part!r}")
        if not self.trainable_layers and self.num_trainable_layers < 1:
            raise ValueError("--num_trainable_layers must be at least 1")
        try:
            self.layer_list()
        except ValueError:
            raise ValueError(
                f"--trainable_layers must be comma-separated integers, got {self.trainable_layers!r}"
            ) from None

    def layer_list(self) -> list[int] | None:
        return [int(x) for x in self.trainable_layers.split(",") if x.strip()] or None


def chosen_layers(args: Args, num_layers: int) -> list[int]:
    layers = args.layer_list() or list(range(num_layers - args.num_trainable_layers, num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        fix = ("fix --trainable_layers" if args.layer_list() else
               f"--num_trainable_layers {args.num_trainable_layers} asks for more (the default 5 suits chatglm-6b's "
               f"28 layers): use --num_trainable_layers {num_layers} or less, or --trainable_layers")
        raise ValueError(f"freeze: layers {bad} do not exist in a {num_layers}-layer model (it has layers 0 to "
                         f"{num_layers - 1}): {fix}")
    return sorted(set(layers))


def describe(args: Args) -> str:
    which = args.trainable_layers or f"last {args.num_trainable_layers}"
    return f"freeze (train {which} layers, {args.trainable_part})"


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    family = families.of_model(model)
    layers = chosen_layers(args, family.num_layers(model.config))
    path = family.layers_path(model)
    prefixes = tuple(f"{path}.{i}." for i in layers)
    parts = family.parts(model)[args.trainable_part]
    # On an INT4/INT8 base the quantized layers (integers, scales, biases) stay fixed and only the float tensors
    # of the chosen layers (their layernorms) train, as in the seeds' INT4 run.
    fixed = quantized_parameter_names(model)
    enable(p for n, p in model.named_parameters()
           if n.startswith(prefixes) and any(part in n for part in parts) and n not in fixed)
    return model
