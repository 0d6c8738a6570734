"""ChatGLMTokenizer on the shipped tiny ice_text.model: lossless round trips, GLM special-token layout, ids read from
the files (never hard-coded), the 150k image-token offset, THUDM-style directories, left padding, save/load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from chatglm.tokenization_chatglm import ChatGLMTokenizer

TINY = Path(__file__).resolve().parent.parent / "chatglm" / "tiny"
GLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
NAMED = {
    "gmask_token_id": "[gMASK]",
    "mask_token_id": "[MASK]",
    "bos_token_id": "<sop>",
    "eos_token_id": "<eop>",
    "pad_token_id": "<pad>",
    "unk_token_id": "<unk>",
    "end_token_id": "</s>",
}
TEXTS = [
    "故障现象：发动机抖动严重，怠速不稳。",
    "Check Engine灯点亮，读取故障码P0171（System Too Lean）。",
    "第一行\n第二行\n\n第四行\n",
    "列1\t列2\t\t列4",
    "two  spaces, five     spaces",
    "x" + " " * 80 + "y",
    "x" + " " * 85 + "y",
    " " * 81 + "81",
    "  leading and trailing  ",
    " one leading, one trailing ",
    "没见过的字：龘靐齉\t\n  end",
    "def main():\n    print('hello world')\t# greeting",
]


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(TINY / "ice_text.model"))


def _copy_model(dst: Path, config: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY / "ice_text.model", dst / "ice_text.model")
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_lossless(tok: ChatGLMTokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with_specials = tok.encode(text)
    assert tok.decode(with_specials, skip_special_tokens=True) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\nb", ["<n>"]),
        ("a\tb", ["<|tab|>"]),
        ("a  b", ["<|blank_2|>"]),
        ("a     b", ["<|blank_5|>"]),
        ("a" + " " * 80 + "b", ["<|blank_80|>"]),
        ("a" + " " * 85 + "b", ["<|blank_80|>", "<|blank_5|>"]),
        ("a" + " " * 81 + "b", ["<|blank_80|>", "▁"]),
        ("a" + " " * 160 + "b", ["<|blank_80|>", "<|blank_80|>"]),
    ],
)
def test_whitespace_becomes_model_pieces(tok: ChatGLMTokenizer, text: str, expected: list[str]) -> None:
    tokens = tok.tokenize(text)
    spelled = [t for t in tokens if t.startswith("<|") or t == "<n>" or t == "▁"]
    assert spelled[1:] == expected  # spelled[0] is the dummy-prefix "▁" before "a"
    assert not any(c in t for t in tokens for c in " \n\t")


def test_dummy_prefix_is_the_lone_space_piece(tok: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    ids = tok.encode("故障", add_special_tokens=False)
    assert ids[0] == sp.piece_to_id("▁") == 5
    assert tok.decode(ids) == "故障"
    assert tok.decode(tok.encode(" 故障", add_special_tokens=False)) == " 故障"


def test_special_ids_come_from_the_model(tok: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    for attr, piece in NAMED.items():
        assert getattr(tok, attr) == sp.piece_to_id(piece), attr
    assert len(set(getattr(tok, a) for a in NAMED)) == len(NAMED)
    assert tok.vocab_size == len(tok) == sp.get_piece_size()


def test_build_inputs_single_and_pair(tok: ChatGLMTokenizer) -> None:
    a = tok.encode("发动机异响", add_special_tokens=False)
    b = tok.encode("发动机_部件故障_异响", add_special_tokens=False)
    g, sop, eop = tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id
    assert tok.build_inputs_with_special_tokens(a) == a + [g, sop]
    assert tok.build_inputs_with_special_tokens(a, b) == a + [g, sop] + b + [eop]
    assert tok("发动机异响")["input_ids"] == a + [g, sop]
    pair = tok("发动机异响", "发动机_部件故障_异响", return_special_tokens_mask=True)
    assert pair["input_ids"] == a + [g, sop] + b + [eop]
    assert pair["special_tokens_mask"] == [0] * len(a) + [1, 1] + [0] * len(b) + [1]
    marked = tok.get_special_tokens_mask(pair["input_ids"], already_has_special_tokens=True)
    assert marked == pair["special_tokens_mask"]
    assert tok.num_special_tokens_to_add() == 2 and tok.num_special_tokens_to_add(pair=True) == 3


def test_image_token_offset_shifts_every_id(tmp_path: Path, tok: ChatGLMTokenizer) -> None:
    config = json.loads((TINY / "tokenizer_config.json").read_text(encoding="utf-8"))
    shifted = ChatGLMTokenizer.from_pretrained(str(_copy_model(tmp_path, {**config, "num_image_tokens": 20000})))
    for attr in NAMED:
        assert getattr(shifted, attr) == getattr(tok, attr) + 20000, attr
    for text in TEXTS:
        ids = tok.encode(text)
        assert shifted.encode(text) == [i + 20000 for i in ids]
        assert shifted.decode(shifted.encode(text), skip_special_tokens=True) == text
    assert shifted.vocab_size == tok.vocab_size + 20000
    assert shifted.convert_ids_to_tokens(7) == "<image_7>"
    assert shifted.convert_tokens_to_ids("<image_19999>") == 19999


def test_loads_a_thudm_style_directory(tmp_path: Path, tok: ChatGLMTokenizer) -> None:
    official = {
        "name_or_path": "THUDM/chatglm-6b",
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "end_token": "</s>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "num_image_tokens": 0,
        "padding_side": "left",
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "a_field_from_the_future": {"anything": 1},
    }
    loaded = ChatGLMTokenizer.from_pretrained(str(_copy_model(tmp_path / "thudm", official)))
    assert all(getattr(loaded, attr) == getattr(tok, attr) for attr in NAMED)
    assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert loaded.padding_side == "left"
    loaded.save_pretrained(str(tmp_path / "saved"))
    assert "auto_map" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))


def test_batch_pads_on_the_left(tok: ChatGLMTokenizer) -> None:
    batch = tok(["异响", "发动机舱内有焦糊味，线束外皮熔化。"], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long)
    n_pad = len(long) - len(tok("异响")["input_ids"])
    assert n_pad > 0
    assert short[:n_pad] == [tok.pad_token_id] * n_pad
    assert batch["attention_mask"][0] == [0] * n_pad + [1] * (len(short) - n_pad)
    assert batch["attention_mask"][1] == [1] * len(long)
    assert short[-2:] == long[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert tok.decode(short, skip_special_tokens=True) == "异响"


def test_save_then_load_gives_identical_ids(tmp_path: Path, tok: ChatGLMTokenizer) -> None:
    tok.save_pretrained(str(tmp_path))
    assert (tmp_path / "ice_text.model").read_bytes() == (TINY / "ice_text.model").read_bytes()
    again = ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert again.get_vocab() == tok.get_vocab()
    assert all(getattr(again, attr) == getattr(tok, attr) for attr in NAMED)
    assert again.padding_side == "left"


def test_saved_ids_never_override_the_model(tmp_path: Path, tok: ChatGLMTokenizer) -> None:
    # A saved config lists the special tokens with their ids; changing the offset afterwards must still move them.
    tok.save_pretrained(str(tmp_path))
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    assert "added_tokens_decoder" in config
    config_file.write_text(json.dumps({**config, "num_image_tokens": 20000}), encoding="utf-8")
    shifted = ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert all(getattr(shifted, attr) == getattr(tok, attr) + 20000 for attr in NAMED)


def test_direct_construction_has_the_glm_defaults(tok: ChatGLMTokenizer) -> None:
    direct = ChatGLMTokenizer(vocab_file=str(TINY / "ice_text.model"))
    assert all(getattr(direct, attr) == getattr(tok, attr) for attr in NAMED)
    assert direct.padding_side == "left"
    assert direct(["异响", "发动机舱内有焦糊味，线束外皮熔化。"], padding=True)["attention_mask"][0][0] == 0


def test_tiny_model_follows_the_real_piece_layout(sp: spm.SentencePieceProcessor) -> None:
    proto = model_pb2.ModelProto()
    proto.ParseFromString((TINY / "ice_text.model").read_bytes())
    kind = model_pb2.ModelProto.SentencePiece.Type
    pieces = [p.piece for p in proto.pieces]
    assert pieces[0] == "<unk>" and pieces[3] == "<pad>" and pieces[4] == "<n>" and pieces[5] == "▁"
    first = sp.piece_to_id("[MASK]")
    assert pieces[first : first + len(GLM_SPECIALS)] == GLM_SPECIALS
    tab = first + len(GLM_SPECIALS)
    assert pieces[tab] == "<|tab|>"
    for n in range(2, 81):
        assert sp.piece_to_id(f"<|blank_{n}|>") == tab + n - 1
    byte0 = tab + 80
    assert pieces[byte0:] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(p.type == kind.BYTE for p in proto.pieces[byte0:])
    assert all(p.type == kind.NORMAL for p in proto.pieces[6:first])
    assert first - 6 >= 500  # a real text vocabulary, not just characters of the prompt
    assert proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity"  # full-width punctuation is kept as written
    assert sp.encode("，：（）", out_type=str)[1:] == ["，", "：", "（", "）"]
