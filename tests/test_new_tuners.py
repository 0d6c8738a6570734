"""What bitfit, ia3 and adapter need beyond test_tuners.py's shared table: a fresh module changes nothing, generation
with the cache equals it without (and batched equals one at a time), quantized bases, and chatglm-6b's counts."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import prompt, shared_path, tiny_model
from test_generation import PROMPTS, generate, varied
from test_model_invariants import sharpen

from chatglm.quantization import QuantizedLinear, quantize_model
from glmft import checkpoint
from glmft.model import build_model, count_parameters
from glmft.tuners import TUNERS

NEW = {"bitfit": {}, "ia3": {}, "adapter": {"adapter_size": 8}}
IDS = torch.tensor([prompt([10, 11, 12, 13], [20, 21], eop=True), [3, 3, 3] + prompt([30, 31], [40, 41])])
MASK = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])


def applied(method: str, model=None, trained: bool = True):
    tuner = TUNERS[method]
    model = tuner.apply(model if model is not None else tiny_model(), tuner.Args(**NEW[method]))
    if trained:  # move every trainable tensor off its initial value, as a few training steps would
        torch.manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.parametrize("method", ["ia3", "adapter"])
def test_freshly_applied_module_leaves_the_logits_exactly_unchanged(method):
    base = logits(tiny_model())
    assert torch.equal(logits(applied(method, trained=False)), base)
    assert not torch.equal(logits(applied(method)), base)  # and once trained it does change them


@pytest.mark.parametrize("method", NEW)
def test_greedy_generation_with_cache_equals_without_and_batched_equals_one_at_a_time(method):
    model = applied(method, varied(sharpen(tiny_model(), factor=10.0)))
    cached = generate(model, PROMPTS, use_cache=True)
    assert cached == generate(model, PROMPTS, use_cache=False)
    assert cached == [generate(model, [p], use_cache=True)[0] for p in PROMPTS]
    assert len({tuple(r) for r in cached}) > 1  # the prompts really lead to different continuations


def test_adapter_names_are_stable_across_fresh_models(tmp_path):
    tuner = TUNERS["adapter"]
    model = applied("adapter")
    checkpoint.save(model, tmp_path / "ckpt", {"method": "adapter"}, tuner)
    fresh = applied("adapter", tiny_model(), trained=False)  # same base; the load must bring the adapters
    checkpoint.load_weights(fresh, tmp_path / "ckpt", tuner)
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(ValueError, match="already has an adapter"):
        tuner.apply(model, tuner.Args(adapter_size=8))


def test_ia3_checkpoint_with_other_targets_is_rejected(tmp_path):
    tuner = TUNERS["ia3"]
    checkpoint.save(applied("ia3"), tmp_path / "ckpt", {"method": "ia3"}, tuner)
    other = tuner.apply(tiny_model(), tuner.Args(ia3_target="query_key_value", ia3_feedforward=""))
    with pytest.raises(ValueError, match="adapter_config.json: adapter has"):
        checkpoint.load_weights(other, tmp_path / "ckpt", tuner)


def test_bitfit_on_int8_trains_the_float_biases_of_the_quantized_layers_only():
    model = TUNERS["bitfit"].apply(quantize_model(tiny_model(), 8), TUNERS["bitfit"].Args())
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{n}.bias" for n in quantized} <= trainable and all(n.endswith(".bias") for n in trainable)
    model.train()
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
    layer = model.transformer.layers[0].attention.query_key_value
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
    assert layer.weight.grad is None and layer.weight_scale.grad is None


def test_ia3_refuses_a_quantized_base():
    with pytest.raises(ValueError, match="ia3 does not support an INT4/INT8 base"):
        TUNERS["ia3"].apply(quantize_model(tiny_model(), 8), TUNERS["ia3"].Args())


@pytest.mark.parametrize("method,bad", [("adapter", {"adapter_size": 0}),
                                        ("ia3", {"ia3_target": "query_key_value", "ia3_feedforward": "dense"}),
                                        ("ia3", {"ia3_target": " , "})])
def test_args_reject_nonsense(method, bad):
    with pytest.raises(ValueError):
        TUNERS[method].Args(**bad)


@pytest.mark.parametrize("method,trainable,total", [
    ("bitfit", 1_265_664, 6_173_286_400),  # 28 * (7 * 4096 + 16384) + 4096: every bias, LayerNorms included
    ("ia3", 802_816, 6_174_089_216),  # 28 * (3 * 4096 + 16384)
    ("adapter", 29_593_088, 6_202_879_488),  # 28 * 2 * (2 * 4096 * 64 + 64 + 4096)
])
def test_chatglm_6b_counts_with_default_settings(method, trainable, total):
    config = shared_path("fixtures", "configs", "chatglm-6b", "config.json")
    tuner = TUNERS[method]
    model = tuner.apply(build_model(config, torch.float16, meta=True), tuner.Args())
    assert count_parameters(model) == (trainable, total)


def test_full_trains_every_parameter_warns_of_the_adam_state_and_refuses_an_int_base(caplog):
    tuner = TUNERS["full"]
    model = tiny_model()
    logger = logging.getLogger("glmft")  # a training run earlier in the session may have stopped its propagation
    logger.addHandler(caplog.handler)
    try:
        tuner.apply(model, tuner.Args())
    finally:
        logger.removeHandler(caplog.handler)
    trainable, total = count_parameters(model)
    assert trainable == total and all(p.requires_grad for p in model.parameters())
    assert f"full: {total:,} trainable parameters; Adam's fp32 state alone is" in caplog.text
    with pytest.raises(ValueError, match="full: an INT4/INT8 base has integer weights"):
        tuner.apply(quantize_model(tiny_model(), 8), tuner.Args())
