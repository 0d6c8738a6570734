"""Build the tiny ``ice_text.model`` that tests and smoke runs use in place of the real 130k-piece one.

Run from the repository root::

    python -m chatglm.tiny.build_tokenizer

The real model cannot be shipped, but code that handles it must see the same layout: ``<unk>`` 0, ``<pad>`` 3,
``<n>`` 4, the lone dummy-prefix space ``▁`` 5, then the text pieces, then the GLM specials, ``<|tab|>`` and
``<|blank_2|>``..``<|blank_80|>``, and last the 256 byte-fallback pieces. The sentencepiece trainer cannot be told
where to put pieces (it puts user-defined symbols and bytes first), so we train normally and then reorder the pieces
of the ModelProto. A unigram model keys every piece by its string and score, so moving pieces changes ids only, not
segmentation; ``_check`` proves that on the training text.

The output is deterministic (one thread, fixed seed, no file paths recorded in the proto), so rebuilding gives the
same bytes and a diff of ``ice_text.model`` means the data or the recipe changed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from glmft.tasks.triples import DEFAULT_PROMPT

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "data"
SOURCES = [DATA / "sample_train.jsonl", DATA / "sample_test.jsonl"]

# The training scripts' default prompt has one home, glmft.tasks.triples (the task that owns it).
PROMPT = DEFAULT_PROMPT

NEWLINE = "<n>"
GLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE = ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
SPACE = "▁"

# Written by hand in the layout of THUDM/chatglm-6b's tokenizer_config.json (minus its remote-code auto_map), so
# the tiny directory also exercises loading an official-style file.
TOKENIZER_CONFIG = {
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
}


def corpus() -> list[str]:
    """Every text and every answer triple of the sample data, plus the prompt the training scripts prepend."""
    lines = [PROMPT]
    for path in SOURCES:
        for row in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(row)
            lines.append(record["text"])
            lines.extend(t for t in record["answer"].split("\n") if t)
    return lines


def train(lines: list[str]) -> model_pb2.ModelProto:
    spm.set_random_generator_seed(0)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=3000,
        hard_vocab_limit=False,  # the sample data supports only ~1000 text pieces; take what it gives
        character_coverage=1.0,
        byte_fallback=True,  # unseen characters become <0x..> pieces instead of <unk>, as in the real model
        user_defined_symbols=[NEWLINE, *GLM_SPECIALS, *WHITESPACE],
        normalization_rule_name="identity",  # NFKC would turn full-width Chinese punctuation into ASCII
        remove_extra_whitespaces=False,  # single spaces must survive; runs of 2+ are <|blank_n|> before sp sees them
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto


def reorder(proto: model_pb2.ModelProto) -> model_pb2.ModelProto:
    """Move the pieces into the real model's id layout, keeping each piece's score and type."""
    by_piece = {p.piece: p for p in proto.pieces}
    meta = [p for p in proto.pieces[:4]]
    assert [p.piece for p in meta] == ["<unk>", "<s>", "</s>", "<pad>"], [p.piece for p in meta]
    normal = model_pb2.ModelProto.SentencePiece.Type.NORMAL
    byte = model_pb2.ModelProto.SentencePiece.Type.BYTE
    text = [p for p in proto.pieces if p.type == normal and p.piece != SPACE]
    order = (
        meta
        + [by_piece[NEWLINE], by_piece[SPACE]]
        + text
        + [by_piece[s] for s in GLM_SPECIALS + WHITESPACE]
        + [p for p in proto.pieces if p.type == byte]
    )
    assert len(order) == len(proto.pieces) and len({p.piece for p in order}) == len(order)
    out = model_pb2.ModelProto()
    out.CopyFrom(proto)
    del out.pieces[:]
    out.pieces.extend(order)
    out.trainer_spec.vocab_size = len(order)
    return out


def _check(before: model_pb2.ModelProto, after: model_pb2.ModelProto, lines: list[str]) -> None:
    """Same pieces for every line before and after reordering, and lossless decoding (bytes included)."""
    old = spm.SentencePieceProcessor(model_proto=before.SerializeToString())
    new = spm.SentencePieceProcessor(model_proto=after.SerializeToString())
    probes = [*lines, "陌生的字：龘靐 and English text", "x <n> y", "a b"]
    for line in probes:
        pieces = new.encode(line, out_type=str)
        assert pieces == old.encode(line, out_type=str), line
        assert new.decode(new.encode(line)) == line, line
    for want, piece in [(0, "<unk>"), (3, "<pad>"), (4, NEWLINE), (5, SPACE)]:
        assert new.piece_to_id(piece) == want, piece


def main() -> None:
    lines = corpus()
    trained = train(lines)
    model = reorder(trained)
    _check(trained, model, lines)
    (HERE / "ice_text.model").write_bytes(model.SerializeToString())
    (HERE / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    first_special = len(model.pieces) - len(GLM_SPECIALS) - len(WHITESPACE) - 256
    print(f"wrote {HERE / 'ice_text.model'}: {len(model.pieces)} pieces, [MASK] at {first_special}")


if __name__ == "__main__":
    main()
