"""Fine-tuning data: read records (``glmft.records``), encode them in the model family's layout, batch them.

The layout belongs to the family (glmft.families: the tokenizer says which): the prompt the model reads before its
answer, at training and prediction time alike, then the answer and its end token; only the answer and the end are
labelled (ChatGLM v1 also labels its ``<sop>``, as the seeds did)::

    ChatGLM v1:  source + [gMASK] + <sop> | answer + <eop>
    ChatGLM2:    [gMASK] sop "[Round 1]\n\n问：{source}\n\n答：" | answer + </s>
    ChatGLM3:    [gMASK] sop <|user|> "\n{source}" <|assistant|> "\n" | answer + </s>
    causal LM:   chat template (user message + generation prompt) or [BOS] source | answer + EOS

Labels are not shifted here; the model shifts them. The source keeps its start (the prompt) when cut. A cut answer
gets no end token, so the model never learns to stop where the cut happened to fall.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from glmft import families, tasks
from glmft.families.base import IGNORE_INDEX, layout
from glmft.records import DataError, Fields, Record, label_set, read_file, read_records  # noqa: F401 (API)


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


def encode(
    record: Record, tokenizer, max_len: int, max_src_len: int, stats: EncodeStats | None = None
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one record in its family's layout (module docstring); updates ``stats``."""
    check_lengths(max_len, max_src_len)
    family = families.of_tokenizer(tokenizer)
    prompt, source_cut = family.prompt(tokenizer, record.source, max_src_len)
    target = tokenizer.encode(record.target, add_special_tokens=False)
    try:
        input_ids, labels, target_cut = layout(prompt, target, tokenizer.eos_token_id, max_len,
                                               family.LABEL_PROMPT_END)
    except ValueError as err:
        raise DataError(f"{record.path}:{record.line}: {err}") from None
    if stats is not None:
        stats.records += 1
        stats.tokens += len(input_ids)
        stats.supervised += sum(label != IGNORE_INDEX for label in labels)
        stats.longest = max(stats.longest, len(input_ids))
        stats.source_truncated += source_cut
        stats.target_truncated += target_cut
    return {"input_ids": input_ids, "labels": labels}


class SupervisedDataset(torch.utils.data.Dataset):
    """Every record of one file, encoded once here so length problems show in the log before training starts."""

    def __init__(self, path: str | Path, tokenizer, max_len: int = 768, max_src_len: int = 450,
                 prompt_text: str | None = None, task: str = tasks.DEFAULT, input_key: str = "",
                 target_key: str = "") -> None:
        check_lengths(max_len, max_src_len)
        self.path, self.max_len, self.max_src_len = str(path), max_len, max_src_len
        self.records, blank = read_file(path, Fields.of(task, prompt_text, input_key, target_key))
        several = next((r for r in self.records if r.references), None)
        if several is not None:
            raise DataError(f"{several.path}:{several.line}: the target lists {len(several.references)} references; "
                            "a training record needs one (lists are for test files)")
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
    """What the model is given at prediction time: the training example up to where its answer starts."""
    return families.of_tokenizer(tokenizer).prompt(tokenizer, record.source, max_src_len)[0]


def build_prompt_ids(text: str, tokenizer, max_src_len: int, prompt_text: str | None = None,
                     task: str = tasks.DEFAULT) -> list[int]:
    """Prediction input for a bare text, cut exactly as in training: prompt_text (default: the task's) + text, in
    the family's prompt layout."""
    prompt = tasks.get(task).DEFAULT_PROMPT if prompt_text is None else prompt_text
    return record_prompt_ids(Record(prompt + text, "", "<text>", 0), tokenizer, max_src_len)
