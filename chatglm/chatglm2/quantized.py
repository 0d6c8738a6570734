"""INT4/INT8 layers for ChatGLM2/3 (the ``THUDM/chatglm2-6b-int4`` layout), reusing ``chatglm/quantization.py``.

Storage, packing and scales are v1's (the CUDA kernels are the same blob). Two facts of glm2 differ from what
``QuantizedLinear`` does by default, both measured on ``shared/fixtures/chatglm2-tiny-int4``:
- the dequantized weight is ``half(half(q) * scale)``: glm2's kernel writes the weight in the scale's dtype (fp16),
  so with fp32 activations we still round the weight to fp16 first (the exact fp32 product moves logits by 1.4e-3);
- quantizing divides in fp16, ``round(w / scale)`` on the half weight (an fp32 division flips a few ties).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantization import QuantizedLinear, dequantize_for_matmul, pack_int4, quantize_weight

# The six Glm matrices that hold the original's four quantized ones (q/k/v: query_key_value; gate_up: h_to_4h).
QUANTIZED_GLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")


class _StoredDtypeMatmul(torch.autograd.Function):
    """``x @ W^T`` with W dequantized in the scale's dtype, then cast to ``x``'s; gradient to ``x`` only (the
    integers are kept for backward, not the dequantized matrix)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.bits = bits
        return F.linear(x, dequantize_for_matmul(weight, scale, bits, scale.dtype).to(x.dtype))  # [..., out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight, scale = ctx.saved_tensors
        return grad @ dequantize_for_matmul(weight, scale, ctx.bits, scale.dtype).to(grad.dtype), None, None, None


class Glm2QuantizedLinear(QuantizedLinear):
    """``QuantizedLinear`` (same tensors and names) computing with glm2's fp16-rounded weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _StoredDtypeMatmul.apply(x, self.weight, self.weight_scale, self.bits)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantized_like(linear: nn.Linear, bits: int, device=None) -> Glm2QuantizedLinear:
    """An empty quantized layer of ``linear``'s shape (filled by loading a quantized checkpoint)."""
    return Glm2QuantizedLinear(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                               device=device, dtype=linear.weight.dtype)


@torch.no_grad()
def quantize_linear(linear: nn.Linear, bits: int) -> Glm2QuantizedLinear:
    """glm2's quantization of one matrix: v1's scales, ``round(w / scale)`` in fp16; the bias is kept."""
    _, scale = quantize_weight(linear.weight, bits)
    qmax = 2 ** (bits - 1) - 1
    divisor = torch.where(scale == 0, 1.0, scale)  # an all-zero row stays 0 instead of 0/0
    q = torch.round(linear.weight.half() / divisor[:, None]).clamp(-qmax - 1, qmax).to(torch.int8)
    layer = quantized_like(linear, bits, device="meta")
    layer.weight = nn.Parameter(pack_int4(q) if bits == 4 else q, requires_grad=False)
    layer.weight_scale = nn.Parameter(scale, requires_grad=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def replace_linears(model: nn.Module, make) -> None:
    """``make(linear)`` in place of the six matrices of every layer, one at a time (peak: one extra matrix)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in QUANTIZED_GLM_LINEARS:
                    setattr(parent, name, make(child))
