"""Tests for glmft.data: both record layouts, the example layout, truncation, collation and every error message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import chatglm
from glmft.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    SupervisedDataset,
    build_prompt_ids,
    check_lengths,
    collate,
    encode,
    read_records,
    record_prompt_ids,
)
from glmft.tasks.triples import DEFAULT_PROMPT

ROOT = Path(__file__).resolve().parents[1]
SPO = Path(__file__).resolve().parents[2] / "shared" / "data" / "spo"
TEXT = "故障现象：车辆冷启动时发动机抖动严重，怠速不稳。"
ANSWER = "发动机_部件故障_抖动严重\n怠速_性能故障_不稳"


@pytest.fixture(scope="module")
def tok():
    return chatglm.ChatGLMTokenizer.from_pretrained(chatglm.TINY_DIR)


def write_lines(path: Path, rows: list) -> Path:
    """Each row is a dict (dumped as JSON) or a raw string (written as is), one per line."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def v01(text: str = TEXT, answer: str = ANSWER) -> dict:
    return {"text": text, "answer": answer}


def instruction(text: str = TEXT, answer: str = ANSWER, prompt: str = DEFAULT_PROMPT) -> dict:
    return {"instruction": prompt, "input": text, "output": answer}


def test_default_prompt_is_the_seed_string():
    assert "\\n" in DEFAULT_PROMPT and "\n" not in DEFAULT_PROMPT  # a literal backslash-n, as in the seeds
    assert DEFAULT_PROMPT.startswith("你现在是一个信息抽取模型") and DEFAULT_PROMPT.endswith("文本：")


def test_both_layouts_encode_alike(tmp_path, tok):
    a = read_records(write_lines(tmp_path / "a.jsonl", [v01(), v01("短文本。", "")]))
    b = read_records(write_lines(tmp_path / "b.jsonl", [instruction(), instruction("短文本。", "")]))
    assert [(r.source, r.target) for r in a] == [(r.source, r.target) for r in b]
    assert a[0].source == DEFAULT_PROMPT + TEXT and a[1].target == ""
    for x, y in zip(a, b, strict=True):
        assert encode(x, tok, 128, 64) == encode(y, tok, 128, 64)


def test_prompt_text_applies_to_v01_only(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [v01(), instruction(prompt="指令：")])
    first, second = read_records(path, prompt_text="抽取：")
    assert first.source == "抽取：" + TEXT
    assert second.source == "指令：" + TEXT  # the instruction layout carries its own prompt


def test_sample_train_reads_fully():
    path = ROOT / "data" / "sample_train.jsonl"
    records = read_records(path)
    assert len(records) == 61
    assert [r.line for r in records] == list(range(1, 62))
    assert all(r.source.startswith(DEFAULT_PROMPT) and r.path == str(path) for r in records)
    assert sum(r.target == "" for r in records) == 1  # the README's one empty answer


def test_seed_spo_files_in_both_layouts():
    if not SPO.is_dir():
        pytest.skip(f"{SPO} is absent (../shared is not beside this checkout)")
    old = read_records(SPO / "spo_0.json")
    new = read_records(SPO / "instruction_format" / "spo_0.json")
    assert len(old) == 1441
    assert [(r.source, r.target) for r in old] == [(r.source, r.target) for r in new]
    assert sum(r.target == "" for r in old) == 22
    assert len(read_records(SPO / "spo_1.json")) == 50


def test_example_layout(tok):
    record = Record(DEFAULT_PROMPT + TEXT, ANSWER, "x", 1)
    source = tok.encode(record.source, add_special_tokens=False)
    target = tok.encode(ANSWER, add_special_tokens=False)
    out = encode(record, tok, 768, 450)
    ids, labels = out["input_ids"], out["labels"]
    n = len(source)
    assert ids == source + [tok.gmask_token_id, tok.bos_token_id] + target + [tok.eos_token_id]
    assert len(labels) == len(ids)
    assert labels[: n + 1] == [IGNORE_INDEX] * (n + 1)  # source and [gMASK] are not learned
    assert IGNORE_INDEX not in labels[n + 1 :]
    assert labels[n + 1 :] == ids[n + 1 :]  # <sop>, the answer and <eop> are
    assert ids[n] == tok.gmask_token_id and ids[n + 1] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_empty_answer_still_teaches_to_stop(tok):
    out = encode(Record("文本", "", "x", 1), tok, 64, 32)
    assert out["input_ids"][-3:] == [tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id]
    assert out["labels"][-3:] == [IGNORE_INDEX, tok.bos_token_id, tok.eos_token_id]


def test_long_source_is_cut_keeping_its_start(tok, tmp_path):
    record = Record(DEFAULT_PROMPT + TEXT * 20, "发动机_部件故障_抖动严重", "x", 1)
    full = tok.encode(record.source, add_special_tokens=False)
    max_len, max_src_len = 128, 40
    assert len(full) > max_src_len
    ids = encode(record, tok, max_len, max_src_len)["input_ids"]
    assert ids[:max_src_len] == full[:max_src_len]
    assert ids[max_src_len] == tok.gmask_token_id and ids[-1] == tok.eos_token_id
    data = SupervisedDataset(write_lines(tmp_path / "d.jsonl", [v01(TEXT * 20, "a_b_c")]), tok, max_len, max_src_len)
    assert (data.stats.source_truncated, data.stats.target_truncated) == (1, 0)


def test_long_answer_is_cut_without_eop(tok, tmp_path):
    answer = "\n".join([ANSWER] * 30)
    max_len, max_src_len = 96, 60
    out = encode(Record(DEFAULT_PROMPT + TEXT, answer, "x", 1), tok, max_len, max_src_len)
    ids, labels = out["input_ids"], out["labels"]
    n = min(len(tok.encode(DEFAULT_PROMPT + TEXT, add_special_tokens=False)), max_src_len)
    target = tok.encode(answer, add_special_tokens=False)
    room = max_len - n - 3
    assert len(ids) <= max_len and len(labels) == len(ids)
    assert tok.eos_token_id not in ids  # a cut answer must not teach the model to stop there
    assert ids[n + 2 :] == target[:room] and labels[n + 1 :] == ids[n + 1 :]
    data = SupervisedDataset(write_lines(tmp_path / "d.jsonl", [v01(answer=answer), v01()]), tok, max_len, max_src_len)
    assert data.stats.target_truncated == 1 and data.stats.records == 2
    assert data.stats.longest <= max_len
    assert "answer cut (no <eop>) to fit 96: 1" in data.summary()


def test_answer_that_just_fits_keeps_eop(tok):
    record = Record("文本", ANSWER, "x", 1)
    n = len(tok.encode("文本", add_special_tokens=False))
    max_len = n + 3 + len(tok.encode(ANSWER, add_special_tokens=False))
    ids = encode(record, tok, max_len, n)["input_ids"]
    assert len(ids) == max_len and ids[-1] == tok.eos_token_id
    assert encode(record, tok, max_len - 1, n)["input_ids"][-1] != tok.eos_token_id


def test_dataset_items_and_summary(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [v01(), "", v01("短文本。", ""), "   ", "\t"])
    data = SupervisedDataset(path, tok, max_len=128, max_src_len=100)
    assert len(data) == 2
    assert [r.line for r in data.records] == [1, 3]  # line numbers count the blank lines
    assert data[1] == encode(data.records[1], tok, 128, 100)
    s = data.stats
    assert s.blank_lines == 3 and s.records == 2
    assert s.tokens == sum(len(data[i]["input_ids"]) for i in range(2))
    assert s.supervised == sum(sum(x != IGNORE_INDEX for x in data[i]["labels"]) for i in range(2))
    summary = data.summary()
    assert "2 records" in summary and "blank lines skipped: 3" in summary and f"{s.tokens} tokens" in summary
    assert "\n" not in summary


def test_collate_pads_right_to_longest():
    batch = [
        {"input_ids": [7, 8, 9, 10], "labels": [-100, 8, 9, 10]},
        {"input_ids": [5, 6], "labels": [-100, 6]},
    ]
    out = collate(batch, pad_token_id=3)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 4) for t in out.values())
    assert out["input_ids"].tolist() == [[7, 8, 9, 10], [5, 6, 3, 3]]
    assert out["labels"].tolist() == [[-100, 8, 9, 10], [-100, 6, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="differ in length"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_collate_on_real_examples_is_not_padded_to_max_len(tok):
    examples = [encode(Record("文本" * k, ANSWER, "x", 1), tok, 512, 256) for k in (1, 4)]
    out = collate(examples, tok.pad_token_id)
    assert out["input_ids"].shape[1] == max(len(e["input_ids"]) for e in examples) < 512


def test_prompt_ids_match_training_prefix(tok):
    record = Record(DEFAULT_PROMPT + TEXT * 10, ANSWER, "x", 1)
    ids = encode(record, tok, 256, 50)["input_ids"]
    prompt = build_prompt_ids(TEXT * 10, tok, 50)
    assert prompt == ids[: len(prompt)] and prompt[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert len(prompt) == 52
    assert record_prompt_ids(record, tok, 50) == prompt


@pytest.mark.parametrize(
    "row, what",
    [
        ('{"text": "a", "answer": ', "not valid JSON (Expecting value"),
        ('["a", "b"]', "expected a JSON object, got list"),
        ('{"question": "a", "reply": "b"}', "none of the expected keys (found ['question', 'reply'])"),
        ('{"text": "a", "answer": "b", "input": "c"}', "keys of both layouts"),
        ('{"text": "a"}', "field 'answer' is missing"),
        ('{"instruction": "p", "input": "a"}', "field 'output' is missing"),
        ('{"text": 3, "answer": "b"}', "field 'text' must be a string, got int"),
        ('{"instruction": "p", "input": "a", "output": ["x"]}', "field 'output' must be a string, got list"),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, row, what):
    path = write_lines(tmp_path / "bad.jsonl", [v01(), "", row, v01()])
    with pytest.raises(DataError) as err:
        read_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and "bad.jsonl" in message
    assert what in message
    if "layouts" in message or "none of" in message:
        assert "text, answer" in message and "instruction, input, output" in message


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(v01()).encode() + b"\n" + b'{"text": "\xff", "answer": ""}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl:2: not valid UTF-8"):
        read_records(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_records(tmp_path / "nowhere.jsonl")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_file_without_records_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl:\d+: no records"):
        read_records(path)


def test_crlf_and_bom_are_read(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(v01()).encode() + b"\r\n" + json.dumps(instruction()).encode())
    records = read_records(path)
    assert [(r.target, r.line) for r in records] == [(ANSWER, 1), (ANSWER, 2)]


@pytest.mark.parametrize("max_len, max_src_len", [(768, 765), (768, 800), (10, 7), (768, 0)])
def test_length_limits_without_room_for_an_answer_are_rejected(tmp_path, tok, max_len, max_src_len):
    with pytest.raises(ValueError, match="max_src_len"):
        check_lengths(max_len, max_src_len)
    with pytest.raises(ValueError, match="max_src_len"):
        encode(Record("a", "b", "x", 1), tok, max_len, max_src_len)
    with pytest.raises(ValueError, match="max_src_len"):
        SupervisedDataset(write_lines(tmp_path / "d.jsonl", [v01()]), tok, max_len, max_src_len)


def test_tightest_length_limits_are_accepted(tok):
    out = encode(Record("文本" * 50, ANSWER, "x", 1), tok, max_len=20, max_src_len=16)
    assert len(out["input_ids"]) == 19 and out["input_ids"][16:18] == [tok.gmask_token_id, tok.bos_token_id]
