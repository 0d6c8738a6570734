"""ChatGLM2Tokenizer / ChatGLM3Tokenizer: lossless round trips, the appended special ids, [gMASK] sop first, left
padding, save/load, both chat formats (on the shipped tiny tokenizer.model), and, where ../shared is beside the
checkout, the real tokenizer.model's ids against what the original code produced (fixtures/tokenizers/)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from conftest import shared_path

from chatglm.tiny2 import TINY2_DIR
from chatglm.tokenization_chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer, build_prompt

VERSIONS = {"chatglm2": ChatGLM2Tokenizer, "chatglm3": ChatGLM3Tokenizer}
TEXTS = [
    "你好",
    "故障现象：发动机抖动严重，怠速不稳。",
    "Hello, world! How are you today?",
    "第一行\n第二行\n\n第四行\n",
    "列1\t列2\t\t列4",
    "a  b   c    d     e" + " " * 90 + "f",
    "    leading and trailing   ",
    "\n\t starts with whitespace",
    "没见过的字：龘靐齉 😀 ©®™",
    "def f(x):\n    return x * 2\n",
    "sopping eop [gMASK] </s> <s> <unk> <|user|>",  # special-token strings typed in text are text
]
A1 = "你好👋！我是人工智能助手 ChatGLM，很高兴见到你。"
HISTORY2 = [("你好", A1), ("What is 2+2?", "2+2 = 4.")]
HISTORY3 = [{"role": r, "content": c} for q, a in HISTORY2 for r, c in (("user", q), ("assistant", a))]
QUERY = "谢谢\n再见"
# fixtures/tokenizers/chatglm2/README.md and chatglm3/README.md: what the original code builds for this history.
PROMPT2 = ("[Round 1]\n\n问：你好\n\n答：" + A1 + "\n\n[Round 2]\n\n问：What is 2+2?\n\n答：2+2 = 4.\n\n"
           "[Round 3]\n\n问：谢谢\n再见\n\n答：")
DECODED3 = ("[gMASK]sop<|user|> \n 你好<|assistant|> \n " + A1 + "<|user|> \n What is 2+2?<|assistant|> \n 2+2 = 4."
            "<|user|> \n 谢谢\n再见<|assistant|>")


@pytest.fixture(scope="module", params=list(VERSIONS))
def tok(request):
    return VERSIONS[request.param].from_pretrained(str(TINY2_DIR))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert set(ids).isdisjoint(tok.special_ids.values())


def test_newline_and_tab_are_the_byte_pieces_as_in_the_real_file(tok):
    assert tok.encode("\n\t", add_special_tokens=False)[-2:] == [13, 12]


def test_special_ids_come_right_after_the_pieces(tok):
    first = tok.sp.get_piece_size()
    assert first == 1000  # so the ids below are the tiny fixtures' (real id - 63789)
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    if isinstance(tok, ChatGLM3Tokenizer):
        names += ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert tok.special_ids == {name: first + i for i, name in enumerate(names)}
    assert tok.convert_tokens_to_ids(names) == list(range(first, first + len(names)))
    assert tok.vocab_size == len(tok) == first + len(names)
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 0, 2)
    assert (tok.mask_token_id, tok.gmask_token_id, tok.smask_token_id) == (1000, 1001, 1002)
    assert (tok.sop_token_id, tok.eop_token_id) == (1003, 1004)


def test_inputs_start_with_gmask_sop_and_a_pair_ends_with_eos(tok):
    a, b = tok.encode("问题", add_special_tokens=False), tok.encode("答案", add_special_tokens=False)
    assert tok.encode("问题") == [1001, 1003, *a]
    assert tok.build_inputs_with_special_tokens(a, b) == [1001, 1003, *a, *b, 2]
    assert tok.get_special_tokens_mask(a, b) == [1, 1] + [0] * (len(a) + len(b)) + [1]
    assert tok("问题", "答案")["input_ids"] == [1001, 1003, *a, *b, 2]


def test_padding_is_on_the_left_and_position_ids_are_optional(tok):
    batch = tok(["你好", "故障现象：发动机抖动严重"], padding=True)
    short, long = batch["input_ids"]
    pad = len(long) - len(tok.encode("你好"))
    assert short == [0] * pad + tok.encode("你好")
    assert batch["attention_mask"] == [[0] * pad + [1] * (len(short) - pad), [1] * len(long)]
    assert "position_ids" not in batch
    with_positions = type(tok).from_pretrained(str(TINY2_DIR), model_input_names=[
        "input_ids", "attention_mask", "position_ids"])
    positions = with_positions(["你好", "故障现象：发动机抖动严重"], padding=True)["position_ids"]
    assert positions == [[0] * pad + list(range(len(short) - pad)), list(range(len(long)))]


def test_decode_drops_or_writes_the_specials_as_the_original_version_does(tok):
    ids = tok.encode("你好")
    written = "[gMASK]sop 你好" if isinstance(tok, ChatGLM3Tokenizer) else "你好"
    assert tok.decode(ids) == written
    assert tok.decode([*ids, 2, 0]) == written  # </s> and <unk> decode to nothing in both versions
    assert tok.decode([*ids, 1020]) == written  # padded embedding rows past the vocabulary have no text


def test_chatglm2_prompt_counts_rounds_from_one(tok):
    assert build_prompt(QUERY, HISTORY2) == tok.build_prompt(QUERY, HISTORY2) == PROMPT2
    assert build_prompt("hi") == "[Round 1]\n\n问：hi\n\n答："


def test_chatglm3_chat_ids_use_role_tokens_and_end_with_assistant():
    tok = ChatGLM3Tokenizer.from_pretrained(str(TINY2_DIR))
    ids = tok.build_chat_ids(QUERY, HISTORY3)
    encode = tok.sp.encode
    user, assistant = tok.special_ids["<|user|>"], tok.special_ids["<|assistant|>"]
    first_turn = [1001, 1003, user, *encode("\n"), *encode("你好"), assistant]
    assert ids[: len(first_turn)] == first_turn and ids[-1] == assistant
    assert ids.count(user) == 3 and ids.count(assistant) == 3 and 2 not in ids
    assert tok.decode(ids) == DECODED3
    system = tok.build_chat_ids("q", [{"role": "system", "content": "s", "tools": [{"name": "f"}]}])
    assert system[2] == tok.special_ids["<|system|>"]
    assert tok.decode(system).startswith('[gMASK]sop<|system|> \n s\n[\n    {\n        "name": "f"\n    }\n]<|user|>')
    assert tok.build_chat_input(QUERY, HISTORY3)["input_ids"].tolist() == [ids]
    with pytest.raises(ValueError, match="role 'bot'"):
        tok.build_single_message("bot", "", "x")


def test_chatglm3_role_text_is_text_unless_encode_special_tokens():
    plain = ChatGLM3Tokenizer.from_pretrained(str(TINY2_DIR))
    assert plain.special_ids["<|user|>"] not in plain.encode("<|user|>\nhi")
    roles = ChatGLM3Tokenizer.from_pretrained(str(TINY2_DIR), encode_special_tokens=True)
    assert roles.encode("<|user|>\nhi") == [1001, 1003, 1006, *roles.sp.encode("\nhi")]


def test_save_and_load_round_trip(tmp_path):
    tok = ChatGLM3Tokenizer.from_pretrained(str(TINY2_DIR), encode_special_tokens=True)
    tok.add_tokens(["<new>"])
    tok.save_pretrained(tmp_path)
    back = ChatGLM3Tokenizer.from_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.model").read_bytes() == (TINY2_DIR / "tokenizer.model").read_bytes()
    assert back.special_ids == tok.special_ids and back.encode_special_tokens and back.padding_side == "left"
    assert back.get_vocab() == tok.get_vocab() and back.convert_tokens_to_ids("<new>") == 1009
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)


def test_official_style_directory_loads(tmp_path):
    shutil.copy(TINY2_DIR / "tokenizer.model", tmp_path)
    official = {"remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(official))
    tok = ChatGLM2Tokenizer.from_pretrained(str(tmp_path))
    assert tok.encode("你好")[:2] == [1001, 1003]
    tok.save_pretrained(tmp_path / "saved")
    assert "auto_map" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.model in"):
        ChatGLM2Tokenizer(str(tmp_path / "tokenizer.model"))


# ---- the real tokenizer.model (../shared/fixtures/tokenizers), ids as the original code gave them ----

@pytest.fixture(scope="module")
def real_dir():
    return shared_path("fixtures", "tokenizers")


def _real(real_dir, version: str):
    golden = json.loads((real_dir / version / "golden_tokens.json").read_text(encoding="utf-8"))
    return VERSIONS[version](str(real_dir / "chatglm2" / "tokenizer.model")), golden


def test_real_file_is_the_documented_one(real_dir):
    data = (real_dir / "chatglm2" / "tokenizer.model").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "e7dc4c393423b76e4373e5157ddc34803a0189ba96b21ddbb40269d31468a6f2"


@pytest.mark.parametrize("version", list(VERSIONS))
def test_real_special_ids(real_dir, version):
    tok, golden = _real(real_dir, version)
    special = golden["special"]
    assert tok.special_ids == special["appended_special_tokens"]
    assert tok.vocab_size == special["vocab_size (tokenizer.vocab_size, incl. appended specials)"]
    assert (tok.pad_token_id, tok.eos_token_id) == (special["pad"]["id"], special["eos"]["id"])
    assert tok.encode("") == special["prefix_tokens (get_prefix_tokens, added by encode/__call__)"]
    if version == "chatglm3":
        assert tok.chat_eos_token_ids == golden["chat_eos_token_ids (model.chat stops on these)"]


@pytest.mark.parametrize("version", list(VERSIONS))
def test_real_ids_on_the_readme_examples(real_dir, version):
    tok, golden = _real(real_dir, version)
    for example in golden["examples"]:
        text = example["text"]
        assert tok.encode(text) == example["ids"], text
        assert tok.encode(text, add_special_tokens=False) == example["ids_no_special"], text
        assert tok.tokenize(text) == example["pieces"], text
        assert tok.decode(example["ids_no_special"]) == example["decode_no_special"] == text
        assert tok.decode(example["ids"]) == example["decode_with_prefix"], text


@pytest.mark.parametrize("version", list(VERSIONS))
def test_real_left_padded_batch(real_dir, version):
    tok, golden = _real(real_dir, version)
    want = golden["left_padded_batch"]
    tok.model_input_names = ["input_ids", "attention_mask", "position_ids"]
    batch = tok(want["texts"], padding=True)
    assert {k: batch[k] for k in tok.model_input_names} == {k: want[k] for k in tok.model_input_names}


def test_real_chatglm2_prompt_ids(real_dir):
    tok, golden = _real(real_dir, "chatglm2")
    chat = golden["chat"]
    prompt = tok.build_prompt(chat["query"], chat["history"])
    assert prompt == chat["build_prompt"] == PROMPT2
    assert tok([prompt])["input_ids"] == [chat["input_ids"]]


@pytest.mark.parametrize("case", ["chat", "chat_with_system"])
def test_real_chatglm3_chat_ids(real_dir, case):
    tok, golden = _real(real_dir, "chatglm3")
    chat = golden[case]
    ids = tok.build_chat_ids(chat["query"], chat["history"])
    assert ids == chat["input_ids"]
    assert tok.decode(ids) == chat["decoded"]
    role_text = golden["role_text_in_input"]
    assert tok.encode(role_text["text"]) == role_text["encode_special_tokens_false"]
    tok.encode_special_tokens = True
    assert tok.encode(role_text["text"]) == role_text["encode_special_tokens_true"]
