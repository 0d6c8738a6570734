"""Checkpoints: save -> load is bit exact, bad files fail naming the tensor, THUDM-style files load as they are."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import prompt, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMModel

IDS = torch.tensor([prompt([10, 11, 12], [20, 21], eop=True)])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("overrides", [{}, {"pre_seq_len": 4, "prefix_projection": True}])
def test_save_load_round_trip_is_bit_exact(tmp_path, overrides):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight is again.transformer.word_embeddings.weight
    assert torch.equal(logits(model), logits(again))


def test_auto_classes_and_config_overrides_work_offline(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "chatglm"
    assert isinstance(AutoModel.from_pretrained(tmp_path), ChatGLMModel)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, pre_seq_len=16, prefix_projection=True)
    assert isinstance(model, ChatGLMForConditionalGeneration)
    assert model.config.pre_seq_len == 16 and hasattr(model.transformer.prefix_encoder, "trans")


def test_missing_tensor_is_an_error_naming_it(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


def test_wrongly_shaped_tensor_is_an_error_naming_it(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["transformer.layers.0.attention.dense.weight"] = torch.zeros(64, 32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"transformer\.layers\.0\.attention\.dense\.weight"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


def test_thudm_layout_sharded_bin_with_rotary_buffers_and_ptuning_keys(tmp_path):
    """Official layout: sharded .bin + index, fp16, rotary inv_freq buffers, lm_head stored, plus a P-Tuning v2
    checkpoint's transformer.prefix_encoder.* keys; loads without key surgery and computes the same logits."""
    source = tiny_model(pre_seq_len=4)
    state = {k: v.half() for k, v in source.state_dict().items()}
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    for i in range(2):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4).half()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    weight_map = {}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update({k: file for k in keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = source.config.to_dict()
    config.update(torch_dtype="float16", auto_map={"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = tiny_model(pre_seq_len=4)
    expected.load_state_dict({k: v.float() for k, v in source.state_dict().items() if True}, strict=True)
    with torch.no_grad():
        for p in expected.parameters():
            p.copy_(p.half().float())
    assert torch.equal(logits(loaded), logits(expected))


def test_new_prefix_encoder_on_a_base_checkpoint_is_initialised_as_the_original(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, pre_seq_len=64)
    weight = model.transformer.prefix_encoder.embedding.weight
    assert 0.8 < weight.std().item() < 1.2  # N(0, 1) as PyTorch's default Embedding init, not 0.02


def test_ptuning_checkpoint_without_pre_seq_len_fails_naming_the_prefix_tensors(tmp_path):
    """Unexpected tensors are an error too: without pre_seq_len the model has no prefix encoder, and loading a
    P-Tuning checkpoint into it would silently run without the trained prefix."""
    tiny_model(pre_seq_len=4, prefix_projection=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unexpected tensor transformer\.prefix_encoder\.embedding\.weight") as err:
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path, pre_seq_len=None)
    assert "pass pre_seq_len" in str(err.value) and "prefix_projection=True" in str(err.value)
    assert "transformer.prefix_encoder.trans.2.weight" in str(err.value)
    with pytest.raises(ValueError, match=r"prefix_encoder\.trans\.0\.weight.*pass prefix_projection=True"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path, prefix_projection=False)
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval()  # as saved: pre_seq_len in config.json
    assert torch.equal(logits(loaded), logits(tiny_model(pre_seq_len=4, prefix_projection=True)))


def test_stray_tensor_in_a_checkpoint_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["transformer.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor transformer\.layers\.1\.mlp\.extra\.weight"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["gmask_token_id", "bos_token_id"])
def test_config_without_a_special_token_id_fails_at_load_naming_file_and_field(tmp_path, field):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config[field]  # the class default (130001, the released vocabulary's) would not fit this 100-id vocabulary
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: no {field}")):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"no {field}"):
        ChatGLMConfig.from_pretrained(tmp_path)  # the dry run's meta-device path reads the config alone
    config[field] = 130001
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config\.json: special token ids outside the vocabulary .*{field}=130001"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
