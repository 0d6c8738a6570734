"""Full fine-tuning: every parameter of the model trains (the seed project's later version offers it).

The optimizer state is the cost: mixed-precision Adam keeps an fp32 master copy and two moments, 12 bytes per
parameter beside the fp16 weight and gradient (75 GB for a 6B model), so ``apply`` logs that size first and points
at ZeRO-3 with offload (``--deepspeed_config ds_zero3_offload.json``), which partitions it across GPUs and moves it to
host memory. Checkpoints hold every tensor (``trainable.safetensors``, each tied tensor once). Not on an INT4/INT8
base: integer weights have no gradient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from chatglm.quantization import is_quantized
from glmft.tuners.base import enable, freeze_all

NAME = "full"
DEFAULT_LR = 1e-5  # the seeds' freeze/embedding rate, for weights that are already trained
ADAM_STATE_BYTES = 12  # fp32 master copy + Adam m + v, per trainable parameter

log = logging.getLogger("glmft")


@dataclass
class Args:
    """Full fine-tuning has no options of its own."""


def describe(args: Args) -> str:
    return "full (every parameter)"


def apply(model: nn.Module, args: Args) -> nn.Module:
    if is_quantized(model):
        raise ValueError("full: an INT4/INT8 base has integer weights, which cannot train; load the float model")
    freeze_all(model)
    count = enable(model.parameters())  # parameters() yields a tied tensor once
    log.warning("full: %s trainable parameters; Adam's fp32 state alone is %.1f GiB before ZeRO partitioning "
                "(use --deepspeed_config ds_zero3_offload.json on large models)", f"{count:,}",
                count * ADAM_STATE_BYTES / 2**30)
    return model
