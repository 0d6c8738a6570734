"""BitFit (Ben Zaken et al., 2022): train every existing bias of the model, nothing else.

"Every bias" is every parameter whose name ends in ``bias``: the biases of query_key_value, dense, dense_h_to_4h and
dense_4h_to_h, and those of every LayerNorm (the paper's b^{LN} terms; the seeds' bloom-1b4-zh figure of 544,768
counts them too). On an INT4/INT8 base the quantized layers keep their float biases as parameters added after the
integer matmul (chatglm/quantization.py QuantizedLinear), so BitFit trains them as well: unlike the freeze method,
which keeps everything of a quantized layer fixed (quantized_parameter_names), a bias here *is* the method, and its
gradient never touches the integer weights or their scales.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glmft.tuners.base import enable, freeze_all

NAME = "bitfit"
# Ben Zaken et al. swept {1e-4, 4e-4, 7e-4, 1e-3} for BERT; the biases are few and already trained, so they take a
# larger step than a full fine-tune (1e-5) but a smaller one than a prefix learnt from scratch (1e-2). 1e-3, the top
# of the paper's range, suits the short runs this suite makes.
DEFAULT_LR = 1e-3
BIAS_SUFFIX = "bias"  # the one place that says what a bias is called (a Family layer may widen it later)


@dataclass
class Args:
    """BitFit has no options of its own: the biases are all there is to train."""


def describe(args: Args) -> str:
    return "bitfit (every existing bias, LayerNorms and quantized layers included)"


def bias_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if n.rpartition(".")[2] == BIAS_SUFFIX and p.is_floating_point()]


def apply(model: nn.Module, args: Args) -> nn.Module:
    freeze_all(model)
    names = set(bias_names(model))
    if not names:
        raise ValueError("bitfit: the model has no bias parameters to train")
    enable(p for n, p in model.named_parameters() if n in names)
    return model
