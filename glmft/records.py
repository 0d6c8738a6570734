"""Reading records: JSON lines in the layouts the run's task accepts (``glmft.tasks``: ``LAYOUTS``), detected line by
line, each turned into the text the model reads and its target.

* ``{"text", "answer"}``, ``{"content", "summary"}`` (ADGEN), ``{"text", "label"}``, or the keys ``--input_key`` /
  ``--target_key`` name: the model reads ``prompt_text + input`` (the prompt defaults to the task's);
* ``{"instruction", "input", "output"}``: the model reads ``instruction + input`` (the seed files carry the prompt in
  ``instruction``, so ``prompt_text`` is not added again).

A task with several references per test record (generation) also takes a list of strings as the target; training
needs one target per record. Extra keys are ignored. Every bad line fails naming the file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from glmft import tasks
from glmft.tasks.base import Layout
from glmft.tasks.classification import read_labels


class DataError(ValueError):
    """A malformed data line; the message reads ``<file>:<line>: <what is wrong>``, so an editor can jump there."""


@dataclass(frozen=True)
class Record:
    """One training pair with where it came from, so later errors and reports can point back at the file."""

    source: str  # what the model reads
    target: str  # the answer text (the first reference when there are several); may be ""
    path: str
    line: int  # 1-based line number in the file
    text: str = ""  # the record's own input (without the prompt or instruction), for reports
    references: tuple[str, ...] = ()  # a test record's several references (generation); () when it has one

    @property
    def gold(self) -> str | list[str]:
        """What the prediction is scored against."""
        return list(self.references) if self.references else self.target


@dataclass(frozen=True)
class Fields:
    """How a run reads its records: the prompt, the layouts and whether a target may list several references."""

    prompt: str
    layouts: tuple[Layout, ...]
    several: bool

    @classmethod
    def of(cls, task: str = tasks.DEFAULT, prompt_text: str | None = None, input_key: str = "",
           target_key: str = "") -> Fields:
        module = tasks.get(task)
        prompt = module.DEFAULT_PROMPT if prompt_text is None else prompt_text
        return cls(prompt, tasks.layouts(task, input_key, target_key), module.MULTI_REFERENCE)


def _layout(obj: dict, where: str, layouts: Sequence[Layout]) -> Layout:
    """The one layout whose keys ``obj`` has; an ambiguous, partial or unknown record fails naming the field."""
    present = set(obj)
    accepted = " or ".join(layout.text() for layout in layouts)
    complete = [x for x in layouts if set(x.keys()) <= present]
    touched = [x for x in layouts if set(x.keys()) & present]
    # Another layout's key that the complete one does not use makes the record ambiguous ({text, answer, input}).
    used = set(complete[0].keys()) if complete else set()
    rivals = [x for x in touched if complete and x != complete[0] and (set(x.keys()) & present) - used]
    if len(complete) == 1 and not rivals:
        return complete[0]
    if len(complete) > 1 or rivals:
        count = len({*complete, *rivals})
        problem = f"keys of {'both' if count == 2 else count} layouts"
    elif touched:
        missing = [f"'{k}'" for x in touched for k in x.keys() if k not in present]
        needs = ", ".join(f"{x.text()}" for x in touched)
        raise DataError(f"{where}: field {' or '.join(dict.fromkeys(missing))} is missing (found {sorted(obj)}; "
                        f"{needs} needs it); accepted layouts: {accepted}")
    else:
        problem = "none of the expected keys"
    raise DataError(f"{where}: {problem} (found {sorted(obj)}); accepted layouts: {accepted}")


def _target(value: object, key: str, where: str, several: bool) -> tuple[str, ...]:
    """The target as a tuple of references (one, unless the task takes several and the record lists them)."""
    if isinstance(value, str):
        return (value,)
    if several and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    kind = "a string or a non-empty list of strings" if several else "a string"
    raise DataError(f"{where}: field '{key}' must be {kind}, got {type(value).__name__}")


def _parse(raw: str, path: Path, number: int, fields: Fields) -> Record:
    where = f"{path}:{number}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    layout = _layout(obj, where, fields.layouts)
    for key in layout.input_keys:
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    refs = _target(obj[layout.target_key], layout.target_key, where, fields.several)
    inputs = [obj[key] for key in layout.input_keys]
    source = "".join(inputs) if len(inputs) > 1 else fields.prompt + inputs[0]  # an instruction is its own prompt
    return Record(source, refs[0], str(path), number, inputs[-1], refs if len(refs) > 1 else ())


def read_file(path: str | Path, fields: Fields) -> tuple[list[Record], int]:
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
        records.append(_parse(raw, path, number, fields))
    if not records:
        raise DataError(f"{path}:{max(len(rows), 1)}: no records in the file ({blank} blank lines)")
    return records, blank


def read_records(path: str | Path, prompt_text: str | None = None, task: str = tasks.DEFAULT, input_key: str = "",
                 target_key: str = "") -> list[Record]:
    """JSON lines in the layouts ``task`` accepts (or the one ``input_key``/``target_key`` name), detected per line;
    the source is ``prompt_text`` (default: the task's prompt) + input, or instruction + input.

    Extra keys are ignored. Blank lines are skipped (``SupervisedDataset.summary`` reports how many); any other bad
    line raises ``DataError`` naming the file, line and field, because a silently dropped record is a silent bug.
    """
    return read_file(path, Fields.of(task, prompt_text, input_key, target_key))[0]


def label_set(spec: str, path: str | Path, records: Sequence[Record] = (),
              fallback: tuple[list[str], str] | None = None) -> tuple[list[str], str]:
    """A labelled task's label set and where it came from: ``--labels`` or ``labels.json`` beside ``path``
    (``glmft.tasks.classification.read_labels``), else ``fallback`` (predict: the training labels), else the distinct
    targets of ``records``, sorted. Every record's target must be one of the labels."""
    found = read_labels(spec, path) or fallback
    labels, source = found if found else (sorted({r.target for r in records}), f"the labels of {path}")
    known = set(labels)
    for r in records:
        if r.target not in known:
            raise DataError(f"{r.path}:{r.line}: label {r.target!r} is not in the label set ({source}: {labels})")
    return labels, source
