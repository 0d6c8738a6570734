"""INT8 / INT4 weight-only quantization of ChatGLM's layer matrices (the ``THUDM/chatglm-6b-int4`` layout).

Facts kept (``shared/spec/chatglm6b.md`` section 7): the four matrices of every layer are quantized, embeddings are
not; one fp16 scale per output row, ``scale = half(max|w_row| / (2^(bits-1) - 1))``, ``q = round(w / scale)``;
INT4 packs two values per byte, the even column in the high nibble; the layer computes
``x @ (scale * q)^T + b`` in the activation dtype and gives a gradient to its input only.

On CUDA the per-row scaling may run through cpm_kernels, as the original's does; everywhere else (and wherever
those kernels cannot run) the weight is dequantized with plain tensor ops. Both give the same fp16 numbers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# The matrices the original quantizes, by their name inside a layer (``attention.*`` and ``mlp.*``).
QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# cpm_kernels embeds cubins for these compute capabilities only, with no PTX the driver could compile for others.
CPM_CAPABILITIES = ((6, 1), (8, 9))


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"weights can be quantized to 4 or 8 bits, got {bits}")


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float weight -> (int8 ``[out, in]``, or packed ``[out, in/2]`` for INT4; fp16 scales ``[out]``)."""
    _check_bits(bits)
    if w.dim() != 2 or (bits == 4 and w.shape[1] % 2):
        raise ValueError(f"INT{bits} needs a matrix (with an even column count for INT4), got shape {tuple(w.shape)}")
    qmax = 2 ** (bits - 1) - 1
    # max / qmax in fp32 then rounded to fp16 equals the original's fp16 division (fp32 carries enough bits).
    scale = (w.abs().amax(dim=1).float() / qmax).half()  # [out]
    # Divide in fp32 whatever the weight's dtype: quantizing chatglm-tiny's fp16 weights this way reproduces the
    # chatglm-tiny-int4 fixture bit for bit (an fp16 division rounds the quotient first and flips a few ties), and
    # loading the same checkpoint in fp16 or fp32 gives the same integers.
    divisor = torch.where(scale == 0, 1.0, scale.float())  # an all-zero row stays 0 instead of 0/0
    q = torch.round(w.float() / divisor[:, None]).clamp(-qmax - 1, qmax).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` with values in [-8, 7] -> int8 ``[out, in/2]``: even column high nibble, odd column low."""
    nibbles = q.view(torch.uint8) & 0x0F  # two's complement low 4 bits
    return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in/2]`` -> int8 ``[out, in]`` in [-8, 7] (inverse of ``pack_int4``)."""
    high = packed >> 4  # arithmetic shift: the sign of the high nibble is the sign of the byte
    low = ((packed & 0x0F) ^ 8) - 8  # sign-extend the low nibble
    return torch.stack((high, low), dim=-1).flatten(-2)  # [out, in/2, 2] -> [out, in], even column first


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``scale[:, None] * q`` as a ``[out, in]`` matrix in ``dtype``, rounded once from the exact product.

    The product of an fp16 (or bf16) scale and an integer below 2^7 is exact in fp32; an IEEE multiply in ``dtype``
    itself is equally exact-then-rounded when the scale is already stored in ``dtype``. So we multiply in ``dtype``
    when that holds (the common fp16/fp16 case, as the original's kernel does) and in fp32 otherwise.
    """
    ints = unpack_int4(q) if bits == 4 else q
    work = dtype if dtype in (torch.float32, scale.dtype) else torch.float32
    return (ints.to(work) * scale.to(work)[:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Kernel choice: cpm_kernels on CUDA where its cubins run, plain torch otherwise; decided once per device.
# ----------------------------------------------------------------------------------------------------------------
_BACKEND: dict[str, str] = {}


def _cpm_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 ``scale * q`` through cpm_kernels' ``gemm_scale_x`` (int32 matrix times a per-row fp16 scale).

    cpm_kernels has no kernel that reads packed int4 (the original's extraction kernels are THUDM's own binaries),
    so the integers are widened here and the kernel does the per-row scaling, rounding to fp16 as the original does.
    """
    from cpm_kernels.kernels import gemm_scale_x  # importing initialises its own CUDA runtime: only ever on CUDA

    ints = (unpack_int4(q) if bits == 4 else q).to(torch.int32).contiguous()
    scale16 = scale.to(torch.float16).contiguous()
    out = torch.empty(ints.shape, dtype=torch.float16, device=q.device)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    gemm_scale_x(1, ints.shape[0], ints.shape[1], ints.data_ptr(), scale16.data_ptr(), out.data_ptr(), stream)
    return out


def _choose_backend(q: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[str, str]:
    """("cpm_kernels" or "torch", why): cpm_kernels where its cubins run and a first call agrees with plain torch."""
    if q.device.type != "cuda":
        return "torch", f"on {q.device.type}"
    capability = torch.cuda.get_device_capability(q.device)
    if not CPM_CAPABILITIES[0] <= capability <= CPM_CAPABILITIES[1]:
        return "torch", f"cpm_kernels has no kernels for compute capability {capability[0]}.{capability[1]}"
    if q.shape[0] > 65535:
        return "torch", "more rows than cpm_kernels' grid allows"
    try:
        same = torch.equal(_cpm_dequantize(q, scale, bits), dequantize_weight(q, scale, bits, torch.float16))
    except Exception as error:  # a missing package, a CUDA runtime mismatch, a kernel that will not load
        return "torch", f"cpm_kernels failed ({type(error).__name__}: {error})"
    if not same:
        return "torch", "cpm_kernels disagreed with plain torch on a first call"
    return "cpm_kernels", f"compute capability {capability[0]}.{capability[1]}"


def dequantize_for_matmul(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_weight`` through the backend chosen (once, on first use) for ``q``'s device."""
    key = str(q.device)
    if key not in _BACKEND:
        backend, reason = _choose_backend(q, scale, bits)
        _BACKEND[key] = backend
        how = "cpm_kernels" if backend == "cpm_kernels" else "plain torch ops"
        logger.info("quantized layers on %s dequantize with %s (%s)", key, how, reason)
    # Its kernel writes fp16 only, and launches one block per row (a CUDA grid's y dimension stops at 65535).
    if _BACKEND[key] == "cpm_kernels" and dtype == torch.float16 and q.shape[0] <= 65535:
        return _cpm_dequantize(q, scale, bits)
    return dequantize_weight(q, scale, bits, dtype)


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------
class QuantizedMatmul(torch.autograd.Function):
    """``x @ dequant(W)^T``; backward returns the gradient of ``x`` only (the integers and scales never train).

    Only the int weight is kept for backward (the dequantized matrix is rebuilt there), so a frozen quantized layer
    costs no more activation memory than the input it passes a gradient to.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.bits, ctx.x_dtype = bits, x.dtype
        return F.linear(x, dequantize_for_matmul(weight, scale, bits, x.dtype))  # [..., out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight, scale = ctx.saved_tensors
        grad_x = grad @ dequantize_for_matmul(weight, scale, ctx.bits, grad.dtype)  # [..., out] @ [out, in]
        return grad_x.to(ctx.x_dtype), None, None, None


def _is_cast_of(value: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether ``value`` is ``current`` converted to another dtype (and maybe device): nothing new in it."""
    if value.shape != current.shape:
        return False
    if value.is_meta or current.is_meta:
        return True  # no values to lose
    return torch.equal(current.to(value.device, value.dtype), value)


class ScaleParameter(nn.Parameter):
    """A quantized layer's scales: a frozen parameter whose dtype does not follow a cast of the whole model.

    The scales belong to the stored integer format (fp16 in chatglm-6b-int4): a round trip through bf16 would move
    every dequantized weight. DeepSpeed's mixed-precision setup casts each floating parameter with
    ``p.data = p.data.to(bf16)``, and ``module.to(dtype)`` / ``.half()`` assign ``p.data`` the same way; an
    assignment that only converts the dtype keeps the stored values (moved to the new device, if any), and new
    values are stored in the scales' own dtype.
    """

    @property
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        current = torch._C.TensorBase.data.__get__(self)
        if value.dtype != current.dtype:
            value = current.to(value.device) if _is_cast_of(value, current) else value.to(current.dtype)
        torch._C.TensorBase.data.__set__(self, value)


class QuantizedLinear(nn.Module):
    """A frozen INT8/INT4 linear layer under the official names: ``weight`` (int8, packed for INT4),
    ``weight_scale`` (fp16, one per output row) and ``bias``.

    All three are parameters that never require grad, as in the original: they count in "all params" and load by
    name from the chatglm-6b-int4 checkpoint. The bias is added after the matmul (outside the autograd function),
    so it can still be trained if a method enables it; the weight and its scales get no gradient. The scales keep
    their stored dtype through ``model.to(bf16)``, ``.half()`` and DeepSpeed's casts (``ScaleParameter``).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"INT4 packs two columns per byte: in_features must be even, got {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        stored = in_features // 2 if bits == 4 else in_features
        self.weight = nn.Parameter(
            torch.zeros(out_features, stored, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.zeros(out_features, dtype=torch.float16, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """Quantize ``linear``'s weight; the bias is kept as it is (same tensor, now frozen)."""
        layer = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None, device="meta")
        q, scale = quantize_weight(linear.weight, bits)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # Loaders (transformers, from_linear) assign plain Parameters; the scales always become a ScaleParameter.
        if name == "weight_scale" and param is not None and not isinstance(param, ScaleParameter):
            param = ScaleParameter(param.data, requires_grad=False)
        super().register_parameter(name, param)

    def _apply(self, fn, recurse: bool = True):
        # module.to(dtype) may also replace a parameter outright (torch.__future__ flags): the scales only move.
        scale = self._parameters.get("weight_scale")

        def keep_scale_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if t is scale and out.dtype != t.dtype else out

        return super()._apply(keep_scale_dtype, recurse)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[out, in]`` matrix this layer multiplies by (for tests, merging and inspection)."""
        return dequantize_weight(self.weight, self.weight_scale, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = QuantizedMatmul.apply(x, self.weight, self.weight_scale, self.bits)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def freeze_quantized(model: nn.Module) -> None:
    """Loaders hand every floating tensor ``requires_grad=True``; the quantized layers' tensors never train."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.requires_grad_(False)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Replace, in place, the four matrices of every layer by ``QuantizedLinear`` (embeddings stay as they are).

    One matrix at a time: each float weight is dropped as soon as its quantized form exists, so the peak memory is
    the float model plus one quantized matrix. Sets ``config.quantization_bit`` so ``save_pretrained`` writes the
    quantized layout.
    """
    _check_bits(bits)
    config = getattr(model, "config", None)
    if getattr(config, "quantization_bit", 0):
        raise ValueError(f"the model is already quantized (quantization_bit={config.quantization_bit})")
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}" and name.rpartition(".")[2] in QUANTIZED_LINEARS
    ]
    if not names:
        raise ValueError("found no layer matrix to quantize (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child), bits))
    if config is not None:
        config.quantization_bit = bits
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds integer weights."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantized_parameter_names(model: nn.Module) -> set[str]:
    """Names of every tensor owned by a quantized layer (integers, scales and biases: all stay fixed)."""
    return {f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, QuantizedLinear)
            for p, _ in module.named_parameters(recurse=False)}
