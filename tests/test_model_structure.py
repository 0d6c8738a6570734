"""The real configs on the meta device: exact parameter counts and the official state-dict names."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path, tiny_model

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration


def official_names(num_layers: int) -> set[str]:
    per_layer = [
        "input_layernorm.weight", "input_layernorm.bias",
        "attention.query_key_value.weight", "attention.query_key_value.bias",
        "attention.dense.weight", "attention.dense.bias",
        "post_attention_layernorm.weight", "post_attention_layernorm.bias",
        "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
    ]
    names = {f"transformer.layers.{i}.{p}" for i in range(num_layers) for p in per_layer}
    return names | {"transformer.word_embeddings.weight", "transformer.final_layernorm.weight",
                    "transformer.final_layernorm.bias", "lm_head.weight"}


def meta_model(name: str, **overrides) -> ChatGLMForConditionalGeneration:
    config = ChatGLMConfig.from_pretrained(shared_path("fixtures", "configs", name), **overrides)
    with torch.device("meta"):
        return ChatGLMForConditionalGeneration(config)


@pytest.mark.parametrize("name,count", [("chatglm-6b", 6_173_286_400), ("chatglm-6b-150k", 6_255_206_400)])
def test_real_config_parameter_count(name, count):
    model = meta_model(name)
    assert model.num_parameters() == count
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_real_config_state_dict_names_and_shapes():
    model = meta_model("chatglm-6b")
    state = model.state_dict()
    assert set(state) == official_names(28)
    assert state["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * 4096, 4096)
    assert state["transformer.layers.27.mlp.dense_h_to_4h.weight"].shape == (16384, 4096)
    assert state["lm_head.weight"].shape == (130528, 4096)


@pytest.mark.parametrize("projection,trainable", [(False, 3_670_016), (True, 956_600_320)])
def test_real_config_prefix_encoder_names_and_counts(projection, trainable):
    model = meta_model("chatglm-6b", pre_seq_len=16, prefix_projection=projection)
    prefix = {n: p.numel() for n, p in model.named_parameters() if ".prefix_encoder." in n}
    expected = {"transformer.prefix_encoder.embedding.weight"}
    if projection:
        expected |= {f"transformer.prefix_encoder.trans.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert set(prefix) == expected
    assert sum(prefix.values()) == trainable


def test_model_freezes_nothing():
    model = tiny_model(pre_seq_len=4)
    assert all(p.requires_grad for p in model.parameters())


def test_config_takes_original_field_names_and_maps_standard_ones():
    config = ChatGLMConfig(num_layers=3, inner_hidden_size=128, hidden_size=32, num_attention_heads=2)
    assert config.num_hidden_layers == 3 and config.intermediate_size == 128
    with pytest.raises(ValueError, match="quantization_bit"):
        ChatGLMConfig(quantization_bit=3)
