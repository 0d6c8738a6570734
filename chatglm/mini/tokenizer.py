"""The mini model's ``ice_text.model``: a sentencepiece unigram model trained on the corpus, in the real layout.

The piece layout (``<unk>`` 0 .. ``<pad>`` 3, ``<n>`` 4, ``▁`` 5, text pieces, the GLM specials, ``<|tab|>``,
``<|blank_n|>``, 256 byte pieces last) and its checks are the tiny tokenizer's (``chatglm.tiny.build_tokenizer``);
only the corpus and the vocabulary size differ.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from chatglm.tiny.build_tokenizer import GLM_SPECIALS, NEWLINE, TOKENIZER_CONFIG, WHITESPACE, _check, reorder


def train(lines: list[str], vocab_size: int, coverage: float = 0.995) -> model_pb2.ModelProto:
    """Train on ``lines`` (whitespace already spelled as pieces, see ``spell``) and reorder into the real layout."""
    spm.set_random_generator_seed(0)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=coverage,  # the rarest characters go to byte pieces instead of taking a piece each
        byte_fallback=True,
        user_defined_symbols=[NEWLINE, *GLM_SPECIALS, *WHITESPACE],
        normalization_rule_name="identity",  # keep full-width punctuation: the answers copy the text as written
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        max_sentence_length=16384,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,  # one thread: the same bytes on every run
        minloglevel=2,
    )
    trained = model_pb2.ModelProto()
    trained.ParseFromString(buffer.getvalue())
    ordered = reorder(trained)
    _check(trained, ordered, lines[:2000])
    return ordered


def spell(text: str) -> str:
    """Newlines as ``<n>`` (the tokenizer's own preprocessing does the same before sentencepiece sees text)."""
    return text.replace("\n", NEWLINE).replace("\t", "<|tab|>")


def write(proto: model_pb2.ModelProto, directory: Path) -> None:
    (directory / "ice_text.model").write_bytes(proto.SerializeToString())
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
