"""The Family layer (glmft.families): each family is found from config.json, lays examples out as its model reads
them at inference, names its layers and method defaults; and every method trains and predicts on tiny ChatGLM2,
ChatGLM3, bloom, llama and qwen2 models through the same scripts as ChatGLM v1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, shared_path, small_args
from family_models import FAMILY_OF, build

from glmft import checkpoint, data, decode, families
from glmft.args import TrainArgs
from glmft.data import IGNORE_INDEX, Record
from glmft.model import build_model, load_tokenizer, model_path
from glmft.train import meta_record
from glmft.tuners import TUNERS

KINDS = list(FAMILY_OF)
TEXTS = ["小明的父亲是谁？", "北京是中国的首都。", "The quick brown fox jumps.", "天气"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {kind: build(root, kind) for kind in KINDS}


def test_families_are_found_from_config_json(family_dirs):
    assert families.of_dir(model_path("tiny")).NAME == "chatglm"
    assert families.of_dir(model_path("mini")).NAME == "chatglm"
    for kind, directory in family_dirs.items():
        assert families.of_dir(directory).NAME == FAMILY_OF[kind]
    expected = {"chatglm-6b": "chatglm", "chatglm-6b-int4": "chatglm", "chatglm2-6b": "chatglm2",
                "chatglm2-6b-int4": "chatglm2", "chatglm3-6b": "chatglm2", "bloom-1b4-zh": "causal_lm"}
    for name, family in expected.items():
        assert families.of_dir(shared_path("fixtures", "configs", name)).NAME == family


def test_an_unknown_model_type_is_refused_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'no_such_model' is none of the families"):
        families.of_dir(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_the_training_example_is_the_prediction_prompt_then_the_answer_and_its_end(family_dirs, kind):
    tokenizer = load_tokenizer(family_dirs[kind])
    record = Record("请回答：" + TEXTS[0], "小明的父亲是老王", "<t>", 1)
    example = data.encode(record, tokenizer, max_len=128, max_src_len=64)
    prompt = data.record_prompt_ids(record, tokenizer, 64)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = tokenizer.encode(record.target, add_special_tokens=False)
    assert ids[len(prompt):] == labels[len(prompt):] == answer + [tokenizer.eos_token_id]
    source = "请回答：" + TEXTS[0]
    if kind == "chatglm2":  # THUDM's ptuning/main.py for ChatGLM2: build_prompt with the specials
        assert prompt == tokenizer.encode(tokenizer.build_prompt(source))
        assert prompt[:2] == [tokenizer.gmask_token_id, tokenizer.sop_token_id]
    elif kind == "chatglm3":  # the user turn, <|assistant|> and its empty metadata line
        assert prompt == tokenizer.build_chat_ids(source) + tokenizer.sp.encode("\n")
    elif kind == "qwen2":  # the tokenizer's chat template
        text = tokenizer.apply_chat_template([{"role": "user", "content": source}], tokenize=False,
                                             add_generation_prompt=True)
        assert text.endswith("<|assistant|>") and prompt == tokenizer.encode(text, add_special_tokens=False)
    else:
        assert prompt == tokenizer.encode(source)


@pytest.mark.parametrize("kind", ["chatglm2", "llama"])
def test_a_cut_source_keeps_its_start_and_the_template(family_dirs, kind):
    tokenizer = load_tokenizer(family_dirs[kind])
    record = Record("请回答：" + TEXTS[1] * 20, "首都", "<t>", 1)
    stats = data.EncodeStats()
    full = data.record_prompt_ids(record, tokenizer, 10_000)
    cut = data.record_prompt_ids(record, tokenizer, 12)
    data.encode(record, tokenizer, max_len=128, max_src_len=12, stats=stats)
    assert stats.source_truncated == 1 and len(cut) < len(full)
    assert tokenizer.decode(cut).replace(" ", "").count("请回答") == 1
    if kind == "chatglm2":
        assert tokenizer.decode(cut).endswith("答：")  # the template's end survives the cut


def test_no_room_for_the_answer_names_the_record(family_dirs):
    tokenizer = load_tokenizer(family_dirs["chatglm2"])
    record = Record(TEXTS[1] * 10, "首都", "train.jsonl", 7)
    with pytest.raises(data.DataError, match=r"train\.jsonl:7: the prompt takes \d+ tokens .*max_len 40"):
        data.encode(record, tokenizer, max_len=40, max_src_len=30)


def test_layers_parts_and_defaults_per_family(family_dirs):
    found = {}
    for kind in ("chatglm2", "bloom", "llama"):
        model = build_model(family_dirs[kind])
        family = families.of_model(model)
        found[kind] = (family.layers_path(model), family.adapter_sites(model), family.lora_targets(model),
                       family.parts(model)["attention"])
    assert found == {
        "chatglm2": ("model.layers", ("self_attn.o_proj", "mlp.down_proj"), ["q_proj", "k_proj", "v_proj"],
                     (".self_attn.",)),
        "bloom": ("transformer.h", ("self_attention.dense", "mlp.dense_4h_to_h"), ["query_key_value"],
                  (".self_attention.",)),
        "llama": ("model.layers", ("self_attn.o_proj", "mlp.down_proj"), ["q_proj", "v_proj"], (".self_attn.",)),
    }


@pytest.mark.parametrize("kind", ["bloom", "llama", "chatglm2"])
def test_freeze_trains_exactly_the_last_layers_of_each_family(family_dirs, kind):
    tuner = TUNERS["freeze"]
    model = tuner.apply(build_model(family_dirs[kind]), tuner.Args(num_trainable_layers=1, trainable_part="mlp"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = families.of_model(model).layers_path(model)
    every = {n for n, _ in model.named_parameters() if n.startswith(f"{layers}.1.") and ".mlp." in n}
    assert names == every and names


def test_pt_uses_chatglm2s_prefix_encoder_and_is_attached_to_causal_lms(family_dirs):
    tuner = TUNERS["pt"]
    args = tuner.Args(pre_seq_len=4)
    model = tuner.apply(build_model(family_dirs["chatglm2"], overrides=tuner.model_overrides(args)), args)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prefix_encoder.embedding.weight"}
    model = tuner.apply(build_model(family_dirs["llama"], overrides=tuner.model_overrides(args)), args)
    assert {n: p.shape for n, p in model.named_parameters() if p.requires_grad} == {
        "prefix_encoder.embedding.weight": (4, 2 * 2 * 2 * 16)}  # 2 x layers x key/value heads x head size
    with pytest.raises(ValueError, match="quantization_bit .*bloom loads in floating point"):
        build_model(family_dirs["bloom"], overrides={"quantization_bit": 4})


@pytest.mark.parametrize("kind,projection", [("llama", False), ("qwen2", True), ("bloom", False)])
def test_a_causal_lms_prefix_is_used_with_and_without_the_cache_and_in_batches(family_dirs, kind, projection):
    """The prefix rides on the model's own cache: cached greedy generation equals generation that recomputes
    everything each step, a left-padded batch equals one prompt at a time, and a moved prefix moves the output."""
    tuner = TUNERS["pt"]
    args = tuner.Args(pre_seq_len=3, prefix_projection=projection)
    model = decisive(tuner.apply(build_model(family_dirs[kind], overrides=tuner.model_overrides(args)), args))
    tokenizer, prompts = family_prompts(family_dirs[kind])
    generation_agrees(model, tokenizer, prompts)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.prefix_encoder.embedding.weight.add_(1.0)
        assert not torch.allclose(model(input_ids=ids).logits, before)


def family_prompts(directory) -> tuple:
    """The family's tokenizer and the prediction prompts of TEXTS (different lengths: a batch is left-padded)."""
    tokenizer = load_tokenizer(directory)
    return tokenizer, [data.build_prompt_ids(t, tokenizer, 64, prompt_text="") for t in TEXTS]


def generation_agrees(model, tokenizer, prompts: list[list[int]], new_tokens: int = 6) -> None:
    """Greedy generation of a left-padded batch == one prompt at a time (cached) == one prompt at a time recomputing
    everything each step (no cache); and the prompts lead to different continuations."""
    settings = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1)
    batched, _ = decode.generate(model, tokenizer, prompts, batch_size=4, **settings)
    single = [decode.generate(model, tokenizer, [p], batch_size=1, **settings)[0][0] for p in prompts]
    uncached = [decode.generate(model, tokenizer, [p], batch_size=1, use_cache=False, **settings)[0][0]
                for p in prompts]
    assert batched == single == uncached
    assert len({tuple(r) for r in batched}) > 1


def decisive(model):
    """Weights at a gain above one, so greedy choices are far from ties: padding's rounding cannot flip an argmax.
    (fp32: transformers' bloom turns a left-padded float64 batch into NaN.)"""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_one_prompt_at_a_time(family_dirs, kind):
    tokenizer, prompts = family_prompts(family_dirs[kind])
    model = decisive(build_model(family_dirs[kind]))
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is left-padded
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=1)
    batched, _ = decode.generate(model, tokenizer, prompts, batch_size=4, **settings)
    single = [decode.generate(model, tokenizer, [p], batch_size=1, **settings)[0][0] for p in prompts]
    assert batched == single
    assert len({tuple(r) for r in batched}) > 1  # the prompts really lead to different continuations


@pytest.mark.parametrize("kind,method", [("chatglm2", "pt"), ("chatglm3", "lora"), ("bloom", "lora"),
                                         ("llama", "adapter"), ("qwen2", "ia3"), ("bloom", "freeze"), ("llama", "pt"),
                                         ("chatglm2", "prompt_tuning"), ("bloom", "p_tuning")])
def test_save_then_load_gives_identical_logits(family_dirs, tmp_path, kind, method):
    tuner = TUNERS[method]
    args = tuner.Args(**{"pt": {"pre_seq_len": 4}, "freeze": {"num_trainable_layers": 1}}.get(method, {}))
    overrides = tuner.model_overrides(args)

    def fresh():
        torch.manual_seed(0)
        return tuner.apply(build_model(family_dirs[kind], overrides=overrides), args).eval()

    model = fresh()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    train = TrainArgs(model_dir=str(family_dirs[kind]), max_len=64, max_src_len=32)
    ckpt = checkpoint.save(model, tmp_path / "ckpt", meta_record(train, args, tuner, overrides, 1, 0), tuner)
    loaded = fresh()
    checkpoint.load_weights(loaded, ckpt, tuner)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(before, after)
    with torch.no_grad():
        assert not torch.equal(fresh()(input_ids=ids).logits, after)  # the load really brought trained tensors


LOOP = """
import json, sys
from pathlib import Path
from glmft import args, families, predict, train
from glmft.tuners import TUNERS
OPTIONS = {"freeze": ["--num_trainable_layers", "1"], "pt": ["--pre_seq_len", "4"], "lora": ["--lora_r", "4"],
           "adapter": ["--adapter_size", "8"]}
model_dir, work = sys.argv[1], Path(sys.argv[2])
found = {}
for name, tuner in TUNERS.items():
    argv = ["--model_dir", model_dir, "--max_steps", "2", "--log_steps", "1", "--max_len", "96", "--max_src_len", "48",
            "--output_dir", str(work / name), *OPTIONS.get(name, [])]
    try:
        ckpt = train.run(*args.parse(tuner, argv), tuner)
    except ValueError as err:  # a method the model has nothing for (bitfit on a model without biases)
        found[name] = {"refused": str(err)}
        continue
    metrics = predict.run(predict.PredictArgs(ckpt_dir=str(ckpt), max_new_tokens=4, limit=3))
    summary = json.loads((work / name / "train_summary.json").read_text())
    found[name] = {"metrics": metrics, "meta": json.loads((ckpt / "meta.json").read_text()),
                   "losses": [h["train/loss"] for h in summary["history"]]}
print("RESULT " + json.dumps(found, ensure_ascii=False, default=str))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_trains_and_predicts_on_each_family(family_dirs, tmp_path, kind):
    """One process per model: every tuner of the table trains 2 steps through glmft.train and predicts the shipped
    triples sample through predict; a method the model cannot take is refused with the reason."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOOP, str(family_dirs[kind]), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert list(found) == list(TUNERS)
    if kind == "llama":  # llama has no bias anywhere: bitfit says so instead of training nothing
        assert found.pop("bitfit") == {"refused": "bitfit: the model has no bias parameters to train"}
    for name, run in found.items():
        assert run["meta"]["method"] == name and run["metrics"]["method"] == name
        assert run["metrics"]["n_records"] == 3 and isinstance(run["metrics"]["micro_f1"], float)
        assert len(run["losses"]) == 2 and all(isinstance(x, float) and x == x for x in run["losses"])


@pytest.mark.parametrize("kind,method,gated", [("chatglm2", "lora", True), ("llama", "freeze", True),
                                               ("bloom", "lora", False), ("qwen2", "embedding", True)])
def test_memory_estimate_bounds_what_each_family_keeps_for_backward(family_dirs, kind, method, gated):
    """The activation formula (grouped-query attention, gated MLP, all-position logits) is an upper bound of what
    autograd really saves on the tiny models (fp32 here: its tensors count half, as fp16 would store them)."""
    from glmft import estimate

    tuner = TUNERS[method]
    args = tuner.Args(**({"num_trainable_layers": 2} if method == "freeze" else {}))
    model = tuner.apply(build_model(family_dirs[kind]), args).train()
    assert estimate.gated_mlp(model) == gated
    ids = torch.randint(5, 300, (2, 48))
    labels = ids.clone()
    labels[:, :30] = -100
    est = estimate.estimate(model, estimate.Setting(batch=2, max_len=48, max_src_len=30))
    assert est.layers_kept == 2
    measured = estimate.saved_activation_bytes(model, {"input_ids": ids, "labels": labels})
    assert 0.5 * est.activations < measured <= est.activations + est.loss_head
    if kind != "bloom":  # GQA: narrower keys and values than the hidden size
        assert estimate.kv_width(model.config) < model.config.hidden_size


def test_compare_dry_run_estimates_chatglm2_6b():
    config = shared_path("fixtures", "configs", "chatglm2-6b", "config.json")
    done = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--dry_run", "--model_dir", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"freeze", "embedding", "pt", "pt_noproj", "lora"}
    # q, k, v adapters of rank 8 on 28 layers: 28 x (3 x 4096 x 8 + 8 x 4096 + 2 x 8 x 256) = 3,784,704, on the
    # 6,243,584,000 of the configs README
    assert "| 3,784,704 | 6.247B |" in rows["lora"] and "| 6.244B |" in rows["pt_noproj"]


@pytest.mark.parametrize("kind", ["chatglm3", "qwen2"])  # ChatGLM2's chat: the next test, in process
def test_the_chat_cli_holds_a_two_turn_chat_with_each_family(family_dirs, kind):
    done = subprocess.run([sys.executable, "-m", "chatglm", "--model_dir", str(family_dirs[kind]), "--max_length",
                           "60", "你好", "再见"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("问：")] == ["问：你好", "问：再见"]
    assert sum(line.startswith("答：") for line in lines) == 2


def test_chatglm3_chat_keeps_role_messages_and_chatglm2_keeps_pairs(family_dirs):
    for kind, first in (("chatglm2", tuple), ("chatglm3", dict)):
        tokenizer = load_tokenizer(family_dirs[kind])
        model = build_model(family_dirs[kind]).eval()
        reply, history = model.chat(tokenizer, "你好", max_length=40, do_sample=False)
        assert isinstance(history[0], first) and len(history) == (1 if kind == "chatglm2" else 2)
        assert isinstance(reply, str)


def test_auto_tokenizer_gives_each_release_its_tokenizer(family_dirs, tmp_path):
    """Saved here (``chatglm_release``) and laid out as the official directories are (tokenizer_config.json naming
    the remote ``ChatGLMTokenizer``; only config.json's ``_name_or_path`` tells ChatGLM3), AutoTokenizer gives
    ChatGLM2Tokenizer or ChatGLM3Tokenizer, never v1's tokenizer on a ChatGLM2 file."""
    from transformers import AutoTokenizer

    from chatglm import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer

    assert type(AutoTokenizer.from_pretrained(family_dirs["chatglm2"])) is ChatGLM2Tokenizer
    assert type(AutoTokenizer.from_pretrained(family_dirs["chatglm3"])) is ChatGLM3Tokenizer
    assert type(AutoTokenizer.from_pretrained(model_path("tiny"))) is ChatGLMTokenizer
    for release, cls in ((2, ChatGLM2Tokenizer), (3, ChatGLM3Tokenizer)):
        official = tmp_path / f"chatglm{release}"
        official.mkdir()
        (official / "tokenizer.model").write_bytes((family_dirs["chatglm2"] / "tokenizer.model").read_bytes())
        (official / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False,
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
        config = json.loads((family_dirs["chatglm2"] / "config.json").read_text())
        (official / "config.json").write_text(json.dumps({**config, "_name_or_path": f"THUDM/chatglm{release}-6b"}))
        assert type(AutoTokenizer.from_pretrained(official)) is cls


@pytest.mark.parametrize("projection,line", [
    (False, "trainable params: 983,040 || all params: 1,304,094,720 || trainable%: 0.0754"),
    (True, "trainable params: 205,641,728 || all params: 1,508,753,408 || trainable%: 13.6299"),
])
def test_prefix_tuning_on_bloom_1b4_zh_counts_as_the_seeds_peft_table(projection, line):
    """PEFT's prefix encoder computes the prefix, so the counts are the seed's (configs README, 10 virtual tokens)."""
    from glmft.model import summary_line

    config = shared_path("fixtures", "configs", "bloom-1b4-zh", "config.json")
    tuner = TUNERS["pt"]
    args = tuner.Args(pre_seq_len=10, prefix_projection=projection)
    model = tuner.apply(build_model(config, torch.float16, tuner.model_overrides(args), meta=True), args)
    assert summary_line(model) == line


@pytest.mark.parametrize("options,line", [
    ({"lora_target": "query_key_value"},
     "trainable params: 1,572,864 || all params: 1,304,684,544 || trainable%: 0.1206"),
    ({"lora_target": "query_key_value,dense_4h_to_h"},
     "trainable params: 3,538,944 || all params: 1,306,650,624 || trainable%: 0.2708"),
    ({"lora_target": r".*\.1.*query_key_value", "modules_to_save": "word_embeddings"},
     "trainable params: 95,225,856 || all params: 1,398,337,536 || trainable%: 6.8099"),
])
def test_lora_target_lists_regexes_and_saved_modules_count_as_the_seeds_peft_table(options, line):
    from glmft.model import summary_line

    config = shared_path("fixtures", "configs", "bloom-1b4-zh", "config.json")
    tuner = TUNERS["lora"]
    args = tuner.Args(lora_alpha=8, lora_dropout=0.0, **options)
    assert summary_line(tuner.apply(build_model(config, torch.float16, meta=True), args)) == line


def test_dora_rslora_layers_and_saved_modules_round_trip(family_dirs, tmp_path):
    tuner = TUNERS["lora"]
    args = tuner.Args(lora_r=4, use_dora=True, use_rslora=True, lora_layers="1", modules_to_save="lm_head")

    def fresh():
        torch.manual_seed(0)
        return tuner.apply(build_model(family_dirs["llama"]), args).eval()

    model = fresh()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n or "lm_head" in n for n in trained)
    assert any("lora_magnitude_vector" in n for n in trained) and any("modules_to_save" in n for n in trained)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    train = TrainArgs(model_dir=str(family_dirs["llama"]), max_len=64, max_src_len=32)
    ckpt = checkpoint.save(model, tmp_path / "ckpt", meta_record(train, args, tuner, {}, 1, 0), tuner)
    loaded = fresh()
    checkpoint.load_weights(loaded, ckpt, tuner)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
        assert not torch.equal(fresh()(input_ids=ids).logits, loaded(input_ids=ids).logits)
    other = tuner.Args(lora_r=4, use_dora=False, use_rslora=True, lora_layers="1", modules_to_save="lm_head")
    with pytest.raises(ValueError, match="adapter has .*use_dora"):
        checkpoint.load_weights(tuner.apply(build_model(family_dirs["llama"]), other), ckpt, tuner)


def test_lora_options_refuse_nonsense():
    from glmft.tuners import lora

    with pytest.raises(ValueError, match="not a regular expression"):
        lora.Args(lora_target="(query")
    with pytest.raises(ValueError, match="--lora_layers must be comma-separated integers"):
        lora.Args(lora_layers="1,x")
    assert lora.Args(lora_target=r".*\.1.*query_key_value").targets() == r".*\.1.*query_key_value"
    assert lora.Args(lora_target="a, b").targets() == ["a", "b"]


@pytest.mark.parametrize("kind", ["chatglm2", "bloom"])
def test_every_method_generates_the_same_cached_uncached_and_batched(family_dirs, kind):
    """Every tuner of the table on a non-v1 family, its tensors moved as training would: greedy generation with the
    cache equals generation that recomputes everything each step, and a left-padded batch equals one at a time."""
    tokenizer, prompts = family_prompts(family_dirs[kind])
    for name, tuner in TUNERS.items():
        args = small_args(tuner)
        try:
            model = tuner.apply(build_model(family_dirs[kind], overrides=tuner.model_overrides(args)), args)
        except ValueError as err:  # bitfit on a model without biases
            assert name == "bitfit" and "no bias" in str(err), (name, err)
            continue
        model = decisive(model)
        torch.manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
        generation_agrees(model, tokenizer, prompts, new_tokens=5)
