"""Fine-tuning data: the only module that knows the prompt layout. Read records, encode them, batch them.

A record is JSON lines in either layout the seed projects used, detected line by line:

* v0.1: ``{"text", "answer"}``; the model reads ``prompt_text + text``.
* instruction: ``{"instruction", "input", "output"}``; the model reads ``instruction + input`` (the seed files
  carry the prompt in ``instruction``, so ``prompt_text`` is not added again).

One example is laid out as the seeds laid it out (see the spec, section 8)::

    input_ids = source + [gMASK] + <sop> + answer + <eop>
    labels    = -100 * (len(source) + 1) + <sop> + answer + <eop>

Labels are not shifted here; the model shifts them. The source keeps its start (the prompt) when cut. A cut answer
gets no <eop>, so the model never learns to stop where the cut happened to fall. Special ids come from the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# The training scripts' default prompt. "\\n" is a literal backslash-n, exactly as the seed scripts have it.
DEFAULT_PROMPT = (
    '你现在是一个信息抽取模型，请你帮我抽取出关系内容为"性能故障", "部件故障", "组成"和 "检测工具"的相关三元组，'
    '三元组内部用"_"连接，三元组之间用\\n分割。文本：'
)
IGNORE_INDEX = -100  # label value the loss skips
LAYOUTS = {"v0.1": ("text", "answer"), "instruction": ("instruction", "input", "output")}


class DataError(ValueError):
    """A malformed data line; the message reads ``<file>:<line>: <what is wrong>``, so an editor can jump there."""


@dataclass(frozen=True)
class Record:
    """One training pair with where it came from, so later errors and reports can point back at the file."""

    source: str  # what the model reads
    target: str  # the answer text (triples joined by "\n"); may be ""
    path: str
    line: int  # 1-based line number in the file
    text: str = ""  # the record's own input (without the prompt or instruction), for reports


def _fields(obj: object, where: str) -> tuple[str, dict[str, str]]:
    """Which layout ``obj`` is in, and its fields, checked to be present and to be strings."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    found = {name for name, keys in LAYOUTS.items() if set(keys) & obj.keys()}
    accepted = " or ".join(f"{name} {{{', '.join(keys)}}}" for name, keys in LAYOUTS.items())
    if len(found) != 1:
        problem = "keys of both layouts" if found else "none of the expected keys"
        raise DataError(f"{where}: {problem} (found {sorted(obj)}); accepted layouts: {accepted}")
    layout = found.pop()
    for key in LAYOUTS[layout]:
        if key not in obj:
            raise DataError(f"{where}: field '{key}' is missing ({layout} layout needs {list(LAYOUTS[layout])})")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    return layout, {key: obj[key] for key in LAYOUTS[layout]}


def _parse(raw: str, where: str, prompt_text: str) -> tuple[str, str, str]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err})") from None
    layout, f = _fields(obj, where)
    if layout == "v0.1":
        return prompt_text + f["text"], f["answer"], f["text"]
    return f["instruction"] + f["input"], f["output"], f["input"]


def _read(path: str | Path, prompt_text: str) -> tuple[list[Record], int]:
    """Records and the number of blank lines skipped (reported, never silent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records, blank = [], 0
    rows = path.read_bytes().split(b"\n")
    if rows and rows[-1] == b"":
        rows.pop()  # the final newline ends the last line; it does not start a blank one
    for number, row in enumerate(rows, start=1):
        where = f"{path}:{number}"
        try:
            raw = row.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if not raw.strip():
            blank += 1
            continue
        source, target, text = _parse(raw, where, prompt_text)
        records.append(Record(source, target, str(path), number, text))
    if not records:
        raise DataError(f"{path}:{max(len(rows), 1)}: no records in the file ({blank} blank lines)")
    return records, blank


def read_records(path: str | Path, prompt_text: str = DEFAULT_PROMPT) -> list[Record]:
    """JSON lines in either layout the seeds used, detected per line: {"text", "answer"} (source = prompt_text + text)
    or {"instruction", "input", "output"} (source = instruction + input; prompt_text is not added).

    Extra keys are ignored. Blank lines are skipped (``SupervisedDataset.summary`` reports how many); any other bad
    line raises ``DataError`` naming the file, line and field, because a silently dropped record is a silent bug.
    """
    return _read(path, prompt_text)[0]


@dataclass
class EncodeStats:
    """Counts for the run log: how much the length limits cut, and how big the data really is."""

    records: int = 0
    tokens: int = 0  # all input_ids
    supervised: int = 0  # labels that are not IGNORE_INDEX
    longest: int = 0
    source_truncated: int = 0
    target_truncated: int = 0  # these examples have no <eop>
    blank_lines: int = 0


def check_lengths(max_len: int, max_src_len: int) -> None:
    """Reject limits that leave no room for the answer: [gMASK], <sop> and <eop> take three places."""
    if max_src_len < 1:
        raise ValueError(f"max_src_len must be at least 1, got {max_src_len}")
    if max_src_len >= max_len - 3:
        raise ValueError(
            f"max_src_len ({max_src_len}) must be less than max_len - 3 ({max_len - 3}): [gMASK], <sop> and <eop> "
            "take three tokens, and at least one must be left for the answer"
        )


def _source_ids(source: str, tokenizer, max_src_len: int) -> tuple[list[int], bool]:
    ids = tokenizer.encode(source, add_special_tokens=False)
    return ids[:max_src_len], len(ids) > max_src_len


def encode(
    record: Record, tokenizer, max_len: int, max_src_len: int, stats: EncodeStats | None = None
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one record in the seeds' layout (module docstring); updates ``stats``."""
    check_lengths(max_len, max_src_len)
    source, source_cut = _source_ids(record.source, tokenizer, max_src_len)
    target = tokenizer.encode(record.target, add_special_tokens=False)
    room = max_len - len(source) - 3
    target_cut = len(target) > room
    answer = [tokenizer.bos_token_id, *target[:room]] + ([] if target_cut else [tokenizer.eos_token_id])
    input_ids = [*source, tokenizer.gmask_token_id, *answer]
    labels = [IGNORE_INDEX] * (len(source) + 1) + answer
    if stats is not None:
        stats.records += 1
        stats.tokens += len(input_ids)
        stats.supervised += len(answer)
        stats.longest = max(stats.longest, len(input_ids))
        stats.source_truncated += source_cut
        stats.target_truncated += target_cut
    return {"input_ids": input_ids, "labels": labels}


class SupervisedDataset(torch.utils.data.Dataset):
    """Every record of one file, encoded once here so length problems show in the log before training starts."""

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        max_len: int = 768,
        max_src_len: int = 450,
        prompt_text: str = DEFAULT_PROMPT,
    ) -> None:
        check_lengths(max_len, max_src_len)
        self.path, self.max_len, self.max_src_len = str(path), max_len, max_src_len
        self.records, blank = _read(path, prompt_text)
        self.stats = EncodeStats(blank_lines=blank)
        self.examples = [encode(r, tokenizer, max_len, max_src_len, self.stats) for r in self.records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def summary(self) -> str:
        """One log line: size of the data and what the length limits cut."""
        s = self.stats
        return (
            f"{self.path}: {s.records} records, {s.tokens} tokens ({s.supervised} supervised, longest {s.longest}); "
            f"source cut to {self.max_src_len}: {s.source_truncated}, answer cut (no <eop>) to fit {self.max_len}: "
            f"{s.target_truncated}; blank lines skipped: {s.blank_lines}"
        )


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right to the longest example in the batch (not to max_len, which would waste compute on pads)."""
    if not batch:
        raise ValueError("collate got an empty batch")
    width = max(len(example["input_ids"]) for example in batch)
    input_ids, labels, mask = [], [], []
    for example in batch:
        n = len(example["input_ids"])
        if len(example["labels"]) != n:
            raise ValueError(f"input_ids ({n}) and labels ({len(example['labels'])}) differ in length")
        pad = width - n
        input_ids.append([*example["input_ids"], *[pad_token_id] * pad])
        labels.append([*example["labels"], *[IGNORE_INDEX] * pad])
        mask.append([1] * n + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


def record_prompt_ids(record: Record, tokenizer, max_src_len: int) -> list[int]:
    """What the model is given at prediction time: the training example up to and including <sop>."""
    source, _ = _source_ids(record.source, tokenizer, max_src_len)
    return [*source, tokenizer.gmask_token_id, tokenizer.bos_token_id]


def build_prompt_ids(text: str, tokenizer, max_src_len: int, prompt_text: str = DEFAULT_PROMPT) -> list[int]:
    """Prediction input for a bare text, cut exactly as in training: prompt_text + text, [gMASK], <sop>."""
    return record_prompt_ids(Record(prompt_text + text, "", "<text>", 0), tokenizer, max_src_len)
