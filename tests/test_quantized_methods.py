"""Every method on an INT4 base: what trains, training, checkpoint round trip and prediction on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, shared_path

import chatglm
from chatglm.quantization import QuantizedLinear, quantize_model, quantized_parameter_names
from glmft import checkpoint, predict
from glmft.args import TrainArgs
from glmft.data import SupervisedDataset, collate
from glmft.model import build_model, count_parameters
from glmft.train import meta_record
from glmft.tuners import TUNERS

METHOD_ARGS = {"freeze": {"num_trainable_layers": 1}, "embedding": {},
               "pt": {"pre_seq_len": 3, "prefix_projection": True}, "lora": {"lora_r": 4}, "bitfit": {},
               "ia3": {}, "adapter": {"adapter_size": 8}, "prompt_tuning": {"num_virtual_tokens": 3},
               "p_tuning": {"num_virtual_tokens": 3}}


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    model, tok = chatglm.tiny()
    path = tmp_path_factory.mktemp("tiny-int4")
    quantize_model(model, 4).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch():
    tok = chatglm.ChatGLMTokenizer.from_pretrained(chatglm.TINY_DIR)
    data = SupervisedDataset(ROOT / "data" / "sample_train.jsonl", tok, max_len=96, max_src_len=60)
    return collate([data[i] for i in range(4)], tok.pad_token_id)


def prepared(method, int4_dir, seed=0):
    tuner = TUNERS[method]
    args = tuner.Args(**METHOD_ARGS[method])
    overrides = tuner.model_overrides(args)
    torch.manual_seed(seed)
    return tuner, args, overrides, tuner.apply(build_model(int4_dir, overrides=overrides), args)


# ia3, adalora: PEFT wraps no custom layer for them; full: integer weights cannot train (all refused, tested where
# they are defined)
@pytest.mark.parametrize("method", [m for m in TUNERS if m not in ("ia3", "adalora", "full")])
def test_method_trains_saves_reloads_and_predicts_on_int4(method, int4_dir, batch, tmp_path):
    tuner, args, overrides, model = prepared(method, int4_dir)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fixed = quantized_parameter_names(model)
    if method == "bitfit":  # its method is the biases, the quantized layers' float ones included
        fixed = {n for n in fixed if not n.endswith(".bias")}
    assert trainable and not trainable & fixed  # integers, scales (and, but for bitfit, biases) stay fixed
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    model.eval()
    train = TrainArgs(model_dir=str(int4_dir), max_len=200, max_src_len=150)
    checkpoint.save(model, tmp_path / "ckpt", meta_record(train, args, tuner, overrides, 8, 0), tuner)
    *_, fresh = prepared(method, int4_dir, seed=5)
    checkpoint.load_weights(fresh, tmp_path / "ckpt", tuner)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh.eval()(**batch).logits)
    result = predict.run(predict.PredictArgs(test_path=str(ROOT / "data" / "sample_test.jsonl"),
                                             ckpt_dir=str(tmp_path / "ckpt"), max_new_tokens=4, limit=4), tuner)
    assert result["n_records"] == 4


def test_freeze_on_int4_trains_only_the_layernorms(int4_dir):
    *_, model = prepared("freeze", int4_dir)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"transformer.layers.1.{ln}.{w}" for ln in ("input_layernorm", "post_attention_layernorm")
        for w in ("weight", "bias")}


def test_lora_merge_into_int4_is_refused(int4_dir):
    tuner, *_, model = prepared("lora", int4_dir)
    with pytest.raises(ValueError, match="cannot be merged into an INT4/INT8 base"):
        tuner.merge(model)


@pytest.mark.parametrize("method,extra,trainable,total", [
    ("freeze", {}, 81_920, 3_355_746_304),
    ("embedding", {}, 534_642_688, 3_355_746_304),
    ("pt", {"prefix_projection": True}, 956_600_320, 4_312_346_624),
    ("lora", {}, 3_670_016, 3_359_416_320),
])
def test_int4_config_reproduces_the_seed_reports(method, extra, trainable, total):
    config = shared_path("fixtures", "configs", "chatglm-6b-int4", "config.json")
    tuner = TUNERS[method]
    args = tuner.Args(**extra)
    overrides = tuner.model_overrides(args)
    model = tuner.apply(build_model(config, torch.float16, overrides, meta=True), args)
    assert count_parameters(model) == (trainable, total)
