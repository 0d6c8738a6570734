"""Build the tiny ``tokenizer.model`` that stands in for ChatGLM2/3's real 64789-piece one in tests.

Run from the repository root::

    python -m chatglm.tiny2.build_tokenizer

It has the real file's layout, so code written against one works on the other: a sentencepiece BPE model with
``<unk>`` 0 (= pad), ``<s>`` 1, ``</s>`` 2, the 256 byte-fallback pieces from 3 (newline 13, tab 12: neither gets a
piece of its own), then the text pieces; identity normalisation, whitespace kept, dummy prefix on. It has exactly
1000 pieces, so ``ChatGLM2Tokenizer`` / ``ChatGLM3Tokenizer`` put [MASK]..eop at 1000..1004 and the role tokens at
1005..1008: the tiny ids of ``../shared/fixtures/chatglm2-tiny`` and ``chatglm3-tiny`` (real id - 63789), whose
checkpoints have a 1024-row vocabulary.

The output is deterministic (one thread, fixed seed, no paths recorded), so a rebuild gives the same bytes.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from glmft.tasks.triples import DEFAULT_PROMPT

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "data"
PIECES = 1000  # specials start here, as in the tiny fixtures
# Chat scaffolding of both versions and some indented code, so the pieces of prompts and whitespace runs exist.
EXTRA = ["[Round 1]", "[Round 2]", "问：你好", "答：你好", "    return x", "        pass", "a  b   c", "Hello, world!"]
TOKENIZER_CONFIG = {"padding_side": "left", "clean_up_tokenization_spaces": False}


def corpus() -> list[str]:
    """The sample data's texts and answers and the default prompt, cut at newlines and tabs (byte pieces only)."""
    texts = [DEFAULT_PROMPT, *EXTRA]
    for path in sorted(DATA.glob("sample_*.jsonl")):
        for row in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(row)
            texts += [record["text"], record["answer"]]
    return [part for text in texts for part in re.split(r"[\n\t]", text) if part]


def train(lines: list[str]) -> bytes:
    spm.set_random_generator_seed(0)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=PIECES,
        hard_vocab_limit=True,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def check(model: bytes, lines: list[str]) -> None:
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.get_piece_size() == PIECES, sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 12, 13)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0x09>", "<0x0A>"]
    for line in [*lines, "陌生的字：龘靐\tand\nEnglish  text   "]:
        assert sp.decode(sp.encode(line)) == line, line


def main() -> None:
    lines = corpus()
    model = train(lines)
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.ClearField("input")  # sentence_iterator leaves it empty; keep the bytes path-free anyway
    model = proto.SerializeToString()
    check(model, lines)
    (HERE / "tokenizer.model").write_bytes(model)
    (HERE / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'tokenizer.model'}: {PIECES} pieces")


if __name__ == "__main__":
    main()
