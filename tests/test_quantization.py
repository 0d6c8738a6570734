"""INT8/INT4 base model: the storage format, the fixture in the chatglm-6b-int4 layout, accuracy, gradients through
frozen quantized layers, save/load and quantize-on-load."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, prompt, tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, quantization
from chatglm.quantization import (
    QuantizedLinear,
    dequantize_weight,
    quantize_model,
    quantize_weight,
    unpack_int4,
)

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
IDS = torch.tensor([prompt(list(range(10, 30)), list(range(40, 50)), eop=True)])
LABELS = torch.where(torch.arange(IDS.shape[1]) < 22, -100, IDS)  # the answer from <sop> on
QUANTIZED = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def fixture(name: str) -> Path:
    path = SHARED_FIXTURES / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside this checkout)")
    return path


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def dequantized_float_model(quantized: ChatGLMForConditionalGeneration, **overrides) -> ChatGLMForConditionalGeneration:
    """A float model whose four matrices per layer hold exactly what the quantized model multiplies by."""
    model = tiny_model(**overrides)
    state = {k: v for k, v in quantized.state_dict().items() if not k.endswith((".weight_scale",))}
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = module.dequantized_weight(torch.float32)
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Storage format
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_is_within_half_a_scale_step(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 96, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    w[5] = 0.0  # an all-zero row must not turn into NaN
    q, scale = quantize_weight(w, bits)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (48,)
    assert q.shape == ((48, 48) if bits == 4 else (48, 96))
    ints = unpack_int4(q) if bits == 4 else q
    qmax = 2 ** (bits - 1) - 1
    assert ints.min() >= -qmax - 1 and ints.max() <= qmax and ints.abs().amax(1).max() == qmax
    assert torch.equal(scale, (w.abs().amax(1) / qmax).half())
    error = (dequantize_weight(q, scale, bits, torch.float32) - w).abs()
    assert error[5].max() == 0
    assert (error <= scale.float()[:, None] * 0.5 * (1 + 1e-6)).all()


def test_int4_packing_order_on_a_hand_made_row():
    # max 0.7 -> scale half(0.1); q = 4, -5, -4, 7; bytes: 0x4B (4 high, -5 = 0xB low), 0xC7 (-4 = 0xC high, 7 low).
    q, scale = quantize_weight(torch.tensor([[0.4, -0.5, -0.4, 0.7]]), 4)
    assert scale.tolist() == [torch.tensor(0.1).half().item()]
    assert q.view(torch.uint8).tolist() == [[0x4B, 0xC7]]
    assert unpack_int4(q).tolist() == [[4, -5, -4, 7]]


def test_int8_stores_one_value_per_byte():
    q, scale = quantize_weight(torch.tensor([[0.5, -1.27, 0.0, 0.004]]), 8)
    assert scale.tolist() == [torch.tensor(0.01).half().item()]
    assert q.tolist() == [[50, -127, 0, 0]]


def test_quantized_linear_is_a_float_linear_on_the_dequantized_weight():
    """fp32: exactly F.linear on scale*q; bf16: the dequantized weight rounded to bf16, the bias added after the
    matmul; the input gradient is the float layer's, and nothing else gets one."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = QuantizedLinear.from_linear(linear, 4)
    assert (layer.in_features, layer.out_features, layer.bits) == (64, 32, 4)
    assert not any(p.requires_grad for p in layer.parameters())
    weight = layer.dequantized_weight(torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, weight) + linear.bias)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, weight) + linear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in layer.parameters())
    x16 = torch.randn(2, 64).bfloat16()
    expected = F.linear(x16, weight.bfloat16()) + linear.bias.detach().bfloat16()
    assert torch.equal(layer(x16), expected) and layer(x16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# The chatglm-6b-int4 layout
# ----------------------------------------------------------------------------------------------------------------
def test_int4_fixture_loads_and_matches_reference_logits():
    root = fixture("chatglm-tiny-int4")
    golden = load_file(root / "golden.safetensors")
    meta = json.loads((root / "golden.json").read_text())
    model = ChatGLMForConditionalGeneration.from_pretrained(root / "model", dtype=torch.float32).eval()
    assert model.config.quantization_bit == 4
    dense = model.transformer.layers[0].attention.dense
    assert isinstance(dense, QuantizedLinear) and dense.weight.shape == (64, 32)
    example = meta["example"]
    assert unpack_int4(dense.weight)[0, :8].tolist() == example["int4_values_first_8"]
    assert dense.weight[0, :4].view(torch.uint8).tolist() == example["packed_bytes_first_4"]
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, QuantizedLinear) for p in m.parameters())
    for case in meta["cases"]:
        ids = golden[f"{case}.input_ids"]
        out = logits(model, ids)
        # measured: max abs error 1.5e-7 (head) and 7.5e-8 (special ids) against the stored fp32 reference
        torch.testing.assert_close(out[..., :512], golden[f"{case}.logits_head"], rtol=0, atol=1e-3)
        torch.testing.assert_close(out[..., 130000:130010], golden[f"{case}.logits_special"], rtol=0, atol=1e-3)
        assert (out[..., :512] - golden[f"{case}.logits_head"]).abs().max() < 1e-5


def test_quantizing_the_fp16_fixture_reproduces_the_int4_fixture_bit_for_bit():
    fp16 = ChatGLMForConditionalGeneration.from_pretrained(fixture("chatglm-tiny") / "model", dtype=torch.float16)
    stored = torch.load(fixture("chatglm-tiny-int4") / "model" / "pytorch_model.bin", weights_only=True)
    state = quantize_model(fp16, 4).state_dict()
    names = [f"transformer.layers.{i}.{m}.{t}" for i in range(2) for m in QUANTIZED for t in ("weight", "weight_scale")]
    for name in names:
        assert state[name].dtype == stored[name].dtype and torch.equal(state[name], stored[name]), name


def test_int4_config_counts_as_the_original_on_the_meta_device():
    config = ChatGLMConfig.from_pretrained(fixture("configs") / "chatglm-6b-int4")
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    assert model.num_parameters() == 3_355_746_304
    state = model.state_dict()
    qkv = "transformer.layers.27.attention.query_key_value"
    assert state[f"{qkv}.weight"].shape == (12288, 2048) and state[f"{qkv}.weight"].dtype == torch.int8
    assert state[f"{qkv}.weight_scale"].shape == (12288,) and state[f"{qkv}.weight_scale"].dtype == torch.float16
    assert state["transformer.layers.0.mlp.dense_4h_to_h.weight"].shape == (4096, 8192)
    assert isinstance(model.transformer.word_embeddings, nn.Embedding)  # embeddings are not quantized


# ----------------------------------------------------------------------------------------------------------------
# Accuracy and gradients on the tiny model
# ----------------------------------------------------------------------------------------------------------------
# Measured (seeds 0-2, 30-token prompt): logits max abs error vs fp32 is 2.5e-5 - 3.4e-5 (INT8) and
# 4.7e-4 - 5.4e-4 (INT4), i.e. 0.8-1.2% (INT8) and 15-20% (INT4) of what the layers' matrices contribute to the
# logits at all (logits change by ~3e-3 when they are zeroed: the random tiny model's residual path dominates).
# One matrix's output error on Gaussian weights with 64 columns: 0.6% (INT8), 10.7% (INT4) relative.
@pytest.mark.parametrize("bits,max_error,max_share", [(8, 1e-4, 0.05), (4, 2e-3, 0.4)])
def test_quantized_logits_stay_close_to_fp32(bits, max_error, max_share):
    reference = logits(tiny_model())
    zeroed = tiny_model()
    with torch.no_grad():
        for name in QUANTIZED:
            for layer in zeroed.transformer.layers:
                layer.get_submodule(name).weight.zero_()
    contribution = (reference - logits(zeroed)).abs().max()
    error = (logits(quantize_model(tiny_model(), bits)) - reference).abs().max()
    assert 0 < error < max_error
    assert error < max_share * contribution
    assert torch.equal(logits(quantize_model(tiny_model(), bits)).argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.15)])
def test_one_matrix_output_error(bits, bound):
    torch.manual_seed(0)
    linear = nn.Linear(64, 192)
    x = torch.randn(50, 64)
    with torch.no_grad():
        exact = F.linear(x, linear.weight)
        approx = QuantizedLinear.from_linear(linear, bits)(x) - linear.bias
    assert (approx - exact).norm() / exact.norm() < bound


def test_gradients_reach_prefix_and_layernorm_through_quantized_layers():
    model = quantize_model(tiny_model(pre_seq_len=4), 4).train()
    model.transformer.prefix_dropout.p = 0.0
    float_model = dequantized_float_model(model, pre_seq_len=4).train()
    float_model.transformer.prefix_dropout.p = 0.0
    trainable = ("transformer.prefix_encoder.", "transformer.layers.0.input_layernorm.")
    for m in (model, float_model):
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith(trainable))
        m(IDS, labels=LABELS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {"transformer.prefix_encoder.embedding.weight",
                          "transformer.layers.0.input_layernorm.weight", "transformer.layers.0.input_layernorm.bias"}
    assert all(g.abs().sum() > 0 for g in grads.values())
    # Layer 0's layernorm sits before all eight quantized matrices: its gradient is the float model's.
    for name, grad in grads.items():
        torch.testing.assert_close(grad, float_model.get_parameter(name).grad, rtol=1e-4, atol=1e-7)


def test_model_freezes_quantized_tensors_only():
    model = quantize_model(tiny_model(), 8)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"transformer.layers.{i}.{m}.{t}" for i in range(2) for m in QUANTIZED
                      for t in ("weight", "weight_scale", "bias")}
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 4)


def test_backend_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(quantization, "_BACKEND", {})
    model = quantize_model(tiny_model(), 4)
    with caplog.at_level(logging.INFO, logger="chatglm.quantization"):
        logits(model)
        logits(model)
    records = [r for r in caplog.records if r.name == "chatglm.quantization"]
    assert len(records) == 1 and "plain torch" in records[0].getMessage()
    assert quantization._BACKEND == {"cpu": "torch"}


# ----------------------------------------------------------------------------------------------------------------
# Save, load, quantize on load
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_saved_quantized_checkpoint_reloads_to_identical_logits(tmp_path, bits):
    model = quantize_model(tiny_model(), bits)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_bit"] == bits
    state = load_file(tmp_path / "model.safetensors")
    qkv = "transformer.layers.0.attention.query_key_value"
    assert state[f"{qkv}.weight"].dtype == torch.int8 and state[f"{qkv}.weight"].shape == (192, 64 * bits // 8)
    assert state[f"{qkv}.weight_scale"].dtype == torch.float16
    again = ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(again.transformer.layers[1].mlp.dense_4h_to_h, QuantizedLinear)
    assert not any(p.requires_grad for m in again.modules() if isinstance(m, QuantizedLinear) for p in m.parameters())
    assert torch.equal(logits(again), logits(model))


def test_quantize_on_load_equals_quantizing_the_loaded_float_model(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    on_load = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, quantization_bit=4).eval()
    after = quantize_model(ChatGLMForConditionalGeneration.from_pretrained(tmp_path), 4).eval()
    assert on_load.config.quantization_bit == 4
    assert isinstance(on_load.transformer.layers[0].attention.query_key_value, QuantizedLinear)
    expected = after.state_dict()
    state = on_load.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert torch.equal(logits(on_load), logits(after))
    via_config = ChatGLMForConditionalGeneration.from_pretrained(
        tmp_path, config=ChatGLMConfig.from_pretrained(tmp_path, quantization_bit=4)
    ).eval()
    assert torch.equal(logits(via_config), logits(after))


def test_quantized_checkpoint_refuses_other_bits_and_missing_scales(tmp_path):
    quantize_model(tiny_model(), 4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="stores INT4 weights"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path, quantization_bit=8)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.layers.1.mlp.dense_h_to_4h.weight_scale"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"transformer\.layers\.1\.mlp\.dense_h_to_4h\.weight_scale"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Casting the whole model (bf16 training): the scales keep the checkpoint's fp16
# ----------------------------------------------------------------------------------------------------------------
def deepspeed_cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What DeepSpeed's engine does to the module under an fp16/bf16 config: every float parameter's ``.data``."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_scales_keep_fp16_through_casts_to_bf16(tmp_path, bits):
    quantize_model(tiny_model(), bits).save_pretrained(tmp_path)
    loaded_in_bf16 = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    casts = {
        "module.to": ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval().to(torch.bfloat16),
        "bfloat16()": ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval().bfloat16(),
        "deepspeed": deepspeed_cast(ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval(), torch.bfloat16),
    }
    expected = logits(loaded_in_bf16)
    for how, model in casts.items():
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert {m.weight_scale.dtype for m in layers} == {torch.float16}, how
        assert {m.bias.dtype for m in layers} == {torch.bfloat16}, how  # everything else does follow the cast
        assert torch.equal(logits(model), expected), how
    # a device move or a same-dtype assignment still goes through; new values are stored as fp16
    layer = casts["module.to"].transformer.layers[0].mlp.dense_4h_to_h
    layer.weight_scale.data = torch.ones(64, dtype=torch.float32)
    assert layer.weight_scale.dtype == torch.float16 and bool((layer.weight_scale == 1).all())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
def test_moving_to_cuda_in_bf16_moves_the_scales_and_keeps_fp16(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    quantize_model(tiny_model(), 4).save_pretrained(tmp_path)
    model = ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval().to("cuda", torch.bfloat16)
    layer = model.transformer.layers[0].attention.query_key_value
    assert layer.weight_scale.device.type == "cuda" and layer.weight_scale.dtype == torch.float16
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval().cuda()
    assert torch.equal(logits(model, IDS.cuda()), logits(loaded, IDS.cuda()))


@pytest.mark.slow
def test_deepspeed_bf16_engine_keeps_fp16_scales(tmp_path):
    """The real engine (bf16 config, DeepSpeed's CPU accelerator): the module it trains keeps fp16 scales."""
    quantize_model(tiny_model(), 4).save_pretrained(tmp_path)
    script = f"""
import os, torch, deepspeed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
deepspeed.init_distributed(dist_backend="gloo")
from chatglm import ChatGLMForConditionalGeneration
from chatglm.quantization import QuantizedLinear
model = ChatGLMForConditionalGeneration.from_pretrained({str(tmp_path)!r})
for name, p in model.named_parameters():
    p.requires_grad_(name.endswith("layernorm.weight"))
config = {{"train_micro_batch_size_per_gpu": 1, "bf16": {{"enabled": True}},
          "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3}}}}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=config)
layers = [m for m in engine.module.modules() if isinstance(m, QuantizedLinear)]
embedding = engine.module.transformer.word_embeddings.weight
print("DTYPES", sorted({{str(m.weight_scale.dtype) for m in layers}}), embedding.dtype)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DTYPES ['torch.float16'] torch.bfloat16" in done.stdout


# ----------------------------------------------------------------------------------------------------------------
# CUDA (cpm_kernels where it runs, plain torch elsewhere): only with a GPU
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_layer_matches_the_cpu_layer(bits):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 512).half(), bits)
    x = torch.randn(4, 7, 256).half()
    expected = F.linear(x.float(), layer.dequantized_weight(torch.float16).float()) + layer.bias.float()
    on_gpu = layer.cuda()
    x_gpu = x.cuda().requires_grad_(True)
    y = on_gpu(x_gpu)
    assert quantization._BACKEND[str(x_gpu.device)] in ("cpm_kernels", "torch")
    torch.testing.assert_close(y.float().cpu(), expected, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    expected_grad = layer.dequantized_weight(torch.float32).cpu().sum(0).expand(4, 7, 256)
    torch.testing.assert_close(x_gpu.grad.float().cpu(), expected_grad, rtol=1e-2, atol=1e-2)
    assert torch.equal(
        quantization.dequantize_for_matmul(on_gpu.weight, on_gpu.weight_scale, bits, torch.float16).cpu(),
        dequantize_weight(on_gpu.weight, on_gpu.weight_scale, bits, torch.float16).cpu(),
    )
