"""The mini model's pretraining corpus: unlabeled Chinese text from the training splits in ``../shared/data``.

Only input fields of training splits go in, never a target and never a test input:

* ``spo/spo_0.json`` ``text`` (the triples texts; not ``answer``, nothing from ``spo_1.json``);
* ``d2q/d2q_0.json`` ``input`` (the documents, each once; not the questions, nothing from ``d2q_1.json``);
* ``adgen/train.jsonl`` ``content`` (attribute lists; not ``summary``, nothing from ``dev.jsonl``);
* ``tnews/train.jsonl`` ``text`` (headlines; not ``label``, nothing from dev/test).

The extraction prompt of the training scripts (``glmft.tasks.triples.DEFAULT_PROMPT``) is the project's own text; it
is given to the tokenizer trainer so that the prefix every fine-tuning input starts with costs few tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

# (name, file under the data root, field holding the input text)
SOURCES = [
    ("spo_0 texts", "spo/spo_0.json", "text"),
    ("d2q_0 documents", "d2q/d2q_0.json", "input"),
    ("adgen train contents", "adgen/train.jsonl", "content"),
    ("tnews train headlines", "tnews/train.jsonl", "text"),
]


@dataclass
class Corpus:
    """Texts per source, in file order, each distinct text once (d2q repeats a document for every question)."""

    texts: dict[str, list[str]] = field(default_factory=dict)

    def all(self) -> list[str]:
        return [t for texts in self.texts.values() for t in texts]

    def counts(self) -> list[tuple[str, int, int]]:
        """(source, texts, characters) per source, for the model card."""
        return [(name, len(texts), sum(map(len, texts))) for name, texts in self.texts.items()]


def _read_field(path: Path, key: str) -> list[str]:
    out: list[str] = []
    for number, row in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not row.strip():
            continue
        value = json.loads(row).get(key)
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number}: field '{key}' is missing or not a string")
        out.append(value)
    return out


def load(root: Path = SHARED_DATA) -> Corpus:
    """Read every source under ``root``; a missing file is an error that says where the data should be."""
    missing = [rel for _, rel, _ in SOURCES if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the mini model is pretrained on the training splits in {root} (../shared/data beside the repository), "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there"
        )
    corpus = Corpus()
    for name, rel, key in SOURCES:
        seen: dict[str, None] = {}
        for text in _read_field(root / rel, key):
            if text.strip():
                seen.setdefault(text, None)
        corpus.texts[name] = list(seen)
    return corpus
