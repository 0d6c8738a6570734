"""ChatGLM2/3 on GlmForCausalLM against the fixtures the original THUDM code made (../shared/fixtures), the real
configs' parameter counts, and save/load under the official names."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import chatglm
from chatglm.chatglm2 import ChatGLM2Config, ChatGLM2ForCausalLM, glm_to_official

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
pytestmark = pytest.mark.skipif(not (FIXTURES / "chatglm2-tiny").is_dir(), reason="../shared fixtures absent")
FAMILY = ("chatglm2-tiny", "chatglm3-tiny")
LOGITS, LOSS = 1e-4, 1e-5


def load(name: str, **overrides) -> ChatGLM2ForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name / "model", dtype=torch.float32, **overrides)
    return model.eval()


def golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / name / "golden.safetensors")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=FAMILY)
def case(request):
    return request.param, load(request.param), golden(request.param)


def test_auto_classes_dispatch_v1_and_v2_by_config_fields():
    assert isinstance(AutoConfig.from_pretrained(FIXTURES / "chatglm2-tiny" / "model"), ChatGLM2Config)
    assert isinstance(AutoConfig.from_pretrained(chatglm.TINY_DIR), chatglm.ChatGLMConfig)
    assert type(AutoModelForCausalLM.from_pretrained(chatglm.TINY_DIR)) is chatglm.ChatGLMForConditionalGeneration


@torch.no_grad()
def test_train_case_logits_loss_and_hidden_states(case):
    _, model, g = case
    out = model(input_ids=g["train.input_ids"], labels=g["train.labels"], output_hidden_states=True)
    assert type(model) is ChatGLM2ForCausalLM
    assert max_diff(out.logits, g["train.logits"]) < LOGITS
    assert abs(out.loss.item() - g["train.loss"].item()) < LOSS
    assert torch.equal(out.logits.argmax(-1), g["train.argmax"])
    # The original's hidden_states: embeddings, then each layer's output; Glm's last entry is after the final norm.
    for i in range(2):
        assert max_diff(out.hidden_states[i], g["train.hidden_states"][i]) < LOGITS


@torch.no_grad()
def test_right_padded_batch_without_mask(case):
    _, model, g = case
    out = model(input_ids=g["batch_right.input_ids"], labels=g["batch_right.labels"])
    assert max_diff(out.logits, g["batch_right.logits"]) < LOGITS
    assert abs(out.loss.item() - g["batch_right.loss"].item()) < LOSS


@pytest.mark.parametrize("which", ["batch_left", "batch_left_nopos"])
@torch.no_grad()
def test_left_padded_batch_real_positions(case, which):
    _, model, g = case
    mask = g[f"{which}.attention_mask"]
    out = model(input_ids=g[f"{which}.input_ids"], attention_mask=mask, position_ids=g.get(f"{which}.position_ids"))
    real = mask.bool()  # pad query rows differ by design (the original lets them see every key)
    assert max_diff(out.logits[real], g[f"{which}.logits"][real]) < LOGITS
    assert torch.equal(out.logits.argmax(-1)[real], g[f"{which}.argmax"][real])


@pytest.mark.parametrize("which", ["greedy", "greedy_batch", "greedy_batch_nopos"])
@torch.no_grad()
def test_greedy_generation_with_cache(case, which):
    _, model, g = case
    inputs = {"input_ids": g[f"{which}.input_ids"]}
    if f"{which}.attention_mask" in g:
        inputs["attention_mask"] = g[f"{which}.attention_mask"]
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, g[f"{which}.output_ids"])
    assert max_diff(torch.stack(out.logits, dim=1), g[f"{which}.step_logits"]) < LOGITS


@pytest.mark.parametrize("projection", [False, True])
@torch.no_grad()
def test_p_tuning_prefix(case, projection):
    name, _, g = case
    key = f"prefix_proj{int(projection)}"
    model = load(name, pre_seq_len=4, prefix_projection=projection)
    prefix = {k[len(key) + len(".prefix_encoder."):]: v for k, v in g.items() if k.startswith(f"{key}.prefix_encoder.")}
    model.prefix_encoder.load_state_dict(prefix)
    out = model(input_ids=g[f"{key}.input_ids"], labels=g[f"{key}.labels"])
    assert max_diff(out.logits, g[f"{key}.logits"]) < LOGITS
    assert abs(out.loss.item() - g[f"{key}.loss"].item()) < LOSS
    assert torch.equal(out.logits.argmax(-1), g[f"{key}.argmax"])


def prefix_model(name: str = "chatglm2-tiny", projection: bool = True) -> ChatGLM2ForCausalLM:
    key, g = f"prefix_proj{int(projection)}", golden(name)
    model = load(name, pre_seq_len=4, prefix_projection=projection)
    prefix = {k[len(key) + len(".prefix_encoder."):]: v for k, v in g.items() if k.startswith(f"{key}.prefix_encoder.")}
    model.prefix_encoder.load_state_dict(prefix)
    return model


@torch.no_grad()
def test_prefix_generation_equals_full_forward_greedy_and_batches():
    model, g = prefix_model(), golden("chatglm2-tiny")
    prompt = g["greedy.input_ids"]
    ids = prompt
    for _ in range(6):  # reference: greedy by full forwards without any cache
        ids = torch.cat((ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)), dim=1)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ids)
    # left-padded batch, one row the prompt above: the same tokens as alone (a fresh prefix cache per call)
    short = g["greedy_batch.input_ids"][1:, 5:]
    batch = torch.cat((prompt, torch.cat((torch.zeros(1, prompt.shape[1] - short.shape[1], dtype=torch.long), short),
                                         dim=1)))
    mask = (batch != 0).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    alone = model.generate(short, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[0], ids[0]) and torch.equal(out[1, -6:], alone[0, -6:])


def test_prefix_trains_and_gradient_checkpointing_keeps_loss_and_gradients():
    g = golden("chatglm2-tiny")
    results = []
    for checkpointing in (False, True):
        model = prefix_model()
        model.train()
        model.prefix_dropout.p = 0.0  # same function both times
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=g["prefix_proj1.input_ids"], labels=g["prefix_proj1.labels"])
        out.loss.backward()
        results.append((out.loss.detach(), model.prefix_encoder.embedding.weight.grad.clone()))
    assert abs(results[0][0].item() - g["prefix_proj1.loss"].item()) < LOSS
    assert results[0][1].abs().sum() > 0
    assert torch.equal(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert model(input_ids=g["train.input_ids"], use_cache=False).cache is None  # the read-only prefix cache


def test_int4_checkpoint():
    g = golden("chatglm2-tiny-int4")
    model = load("chatglm2-tiny-int4")
    assert model.config.quantization_bit == 4
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    with torch.no_grad():
        out = model(input_ids=g["train.input_ids"], labels=g["train.labels"])
        # measured 0.0: glm2's weight half(half(q) * scale) is what Glm2QuantizedLinear multiplies by
        assert max_diff(out.logits, g["train.logits"]) < 1e-5
        assert abs(out.loss.item() - g["train.loss"].item()) < LOSS
        mask = g["batch_left.attention_mask"]
        out = model(input_ids=g["batch_left.input_ids"], attention_mask=mask, position_ids=g["batch_left.position_ids"])
        assert max_diff(out.logits[mask.bool()], g["batch_left.logits"][mask.bool()]) < 1e-5
        out = model.generate(g["greedy.input_ids"], max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, g["greedy.output_ids"])
    assert max_diff(torch.stack(out.logits, dim=1), g["greedy.step_logits"]) < 1e-5
    assert not any(p.requires_grad for n, p in model.named_parameters() if "proj" in n)


def test_quantizing_a_float_checkpoint_on_load_equals_the_int4_layout():
    stored = torch.load(FIXTURES / "chatglm2-tiny-int4" / "model" / "pytorch_model.bin", weights_only=True)
    model = load("chatglm2-tiny", quantization_bit=4)
    mine = glm_to_official(model.state_dict())
    assert set(mine) == set(stored) - {"transformer.rotary_pos_emb.inv_freq"}
    for name, tensor in stored.items():
        if tensor.dtype == torch.int8 or name.endswith("weight_scale"):
            assert torch.equal(mine[name], tensor), name


REAL_COUNTS = {"chatglm2-6b": 6_243_584_000, "chatglm3-6b": 6_243_584_000, "chatglm2-6b-int4": 3_389_436_928}


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_config_parameter_count_and_official_names(name):
    config = AutoConfig.from_pretrained(FIXTURES / "configs" / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model) is ChatGLM2ForCausalLM
    assert sum(p.numel() for p in model.parameters()) == REAL_COUNTS[name]
    names = set(glm_to_official(model.state_dict()))
    layer = "transformer.encoder.layers.27."
    assert {"transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight",
            "transformer.encoder.final_layernorm.weight", layer + "self_attention.query_key_value.bias",
            layer + "mlp.dense_h_to_4h.weight"} <= names
    assert all(n.startswith("transformer.") for n in names)
    if config.quantization_bit:
        assert layer + "self_attention.query_key_value.weight_scale" in names


@pytest.mark.parametrize("pre_seq_len", [None, 4])
def test_save_load_identical_logits_with_official_names(tmp_path, pre_seq_len):
    g = golden("chatglm2-tiny")
    model = prefix_model() if pre_seq_len else load("chatglm2-tiny")
    model.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    with safe_open(files[0], "pt") as f:
        names = set(f.keys())
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in names
    assert all(n.startswith("transformer.") for n in names)
    assert ("transformer.prefix_encoder.trans.0.weight" in names) == bool(pre_seq_len)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "chatglm" and saved["num_layers"] == 2 and saved["pre_seq_len"] == pre_seq_len
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(g["train.input_ids"]).logits, model(g["train.input_ids"]).logits)


def test_p_tuning_checkpoint_without_pre_seq_len_is_an_error_naming_it(tmp_path):
    prefix_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pre_seq_len"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="prefix_encoder.*pre_seq_len"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, pre_seq_len=4, prefix_projection=True).prefix_encoder


@torch.no_grad()
def test_generate_without_cache_gives_the_greedy_ids():
    model, g = load("chatglm3-tiny"), json.loads((FIXTURES / "chatglm3-tiny" / "golden.json").read_text())
    prompt = torch.tensor([g["cases"]["greedy"]["prompt"]])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)
    assert out[0].tolist() == g["cases"]["greedy_nocache"]["output"] == g["cases"]["greedy"]["output"]


def test_pad_id_embedding_row_gets_a_gradient_as_in_the_original():
    model, g = load("chatglm2-tiny"), golden("chatglm2-tiny")
    ids = g["train.input_ids"].clone()
    ids[0, 3] = 0  # id 0 inside the prompt, so later labelled tokens depend on its embedding
    model(input_ids=ids, labels=g["train.labels"]).loss.backward()
    assert model.model.embed_tokens.weight.grad[0].abs().sum() > 0


@torch.no_grad()
def test_thudm_p_tuning_checkpoint_loads_by_its_official_names(tmp_path):
    g = golden("chatglm2-tiny")
    prefix = {k.replace("prefix_proj1.", "transformer."): v for k, v in g.items() if ".prefix_encoder." in k
              and k.startswith("prefix_proj1.")}
    torch.save(prefix, tmp_path / "pytorch_model.bin")  # what THUDM's ptuning main.py leaves in a checkpoint
    model = load("chatglm2-tiny", pre_seq_len=4, prefix_projection=True)
    model.load_prefix_encoder(str(tmp_path))
    assert max_diff(model(g["prefix_proj1.input_ids"]).logits, g["prefix_proj1.logits"]) < LOGITS
    with pytest.raises(ValueError, match="not a P-Tuning"):
        model.load_prefix_encoder({"transformer.output_layer.weight": torch.zeros(1024, 64)})


def test_official_directory_with_auto_map_loads_without_remote_code(tmp_path):
    (tmp_path / "m").mkdir()
    for f in (FIXTURES / "chatglm2-tiny" / "model").iterdir():
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = json.loads((FIXTURES / "configs" / "chatglm2-6b" / "config.json").read_text())["auto_map"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert type(AutoModel.from_pretrained(tmp_path / "m")) is ChatGLM2ForCausalLM  # THUDM's README calls AutoModel
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", pre_seq_len=2)
    assert model.prefix_encoder.embedding.num_embeddings == 2


@torch.no_grad()
def test_int8_on_load_is_close_to_fp32():
    g, model = golden("chatglm2-tiny"), load("chatglm2-tiny", quantization_bit=8)
    layer = model.model.layers[0].mlp.gate_up_proj
    assert layer.weight.dtype == torch.int8 and tuple(layer.weight.shape) == (320, 64)
    assert max_diff(model(g["train.input_ids"]).logits, g["train.logits"]) < 0.05


@pytest.mark.parametrize("dtype,key", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
@torch.no_grad()
def test_half_precision_rotary_table_is_chatglm3s_even_after_a_cast(dtype, key):
    """Documented choice: in half precision both ChatGLM2 and ChatGLM3 use ChatGLM3's table (angles in fp32, then
    cast); ChatGLM2's original rounds positions and angles in fp16 (chatglm2-tiny's rope.*). ``.half()`` (as
    DeepSpeed casts the module) must not round the frequencies."""
    model = load("chatglm3-tiny").to(dtype)
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=dtype), torch.arange(512)[None])  # [1, 512, 8]
    table = golden("chatglm3-tiny")[f"rope.cache_{key}"]  # [512, 4, (cos, sin)]
    assert torch.equal(cos[0, :, :4].float(), table[..., 0]) and torch.equal(sin[0, :, :4].float(), table[..., 1])


@torch.no_grad()
def test_int4_save_load_keeps_the_packed_layout_and_logits(tmp_path):
    g, model = golden("chatglm2-tiny-int4"), load("chatglm2-tiny-int4")
    model.save_pretrained(tmp_path)
    with safe_open(next(tmp_path.glob("*.safetensors")), "pt") as f:
        assert f.get_tensor("transformer.encoder.layers.1.mlp.dense_h_to_4h.weight").dtype == torch.int8
        assert f.get_tensor("transformer.encoder.layers.1.mlp.dense_h_to_4h.weight_scale").dtype == torch.float16
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert again.config.quantization_bit == 4
    assert torch.equal(again(g["train.input_ids"]).logits, model(g["train.input_ids"]).logits)


@pytest.mark.gpu
@torch.no_grad()
def test_int4_and_fp16_on_cuda_match_the_cpu_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for name in ("chatglm2-tiny-int4", "chatglm2-tiny"):
        g = golden(name)
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / name / "model", dtype=torch.float16).eval().cuda()
        logits = model(g["train.input_ids"].cuda()).logits.float().cpu()
        assert max_diff(logits, g["train.logits"]) < 2e-2  # fp16 activations; on the CPU in fp16: 4.2e-3


def test_a_config_that_does_not_fit_the_tensors_names_the_tensor(tmp_path):
    load("chatglm2-tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["multi_query_group_num"] = 1  # the stored query_key_value has 2 key/value groups
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"safetensors: .*query_key_value\.\w+ has 128 rows; .* give 64 \+ 16 \+ 16"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    config["multi_query_group_num"], config["ffn_hidden_size"] = 2, 80  # the stored MLP is 160 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
