"""Build the mini model: tokenizer, pretrained weights and model card, from the training splits in ../shared/data.

Run from the repository root (about half an hour on 2 CPU cores)::

    python -m chatglm.mini.build

Writes ``ice_text.model``, ``tokenizer_config.json``, ``config.json``, ``generation_config.json``,
``model.safetensors`` and ``README.md`` (the model card) into ``chatglm/mini`` (``--output_dir`` to put them
elsewhere). The same seed and thread count give the same bytes on the same machine: the thread count changes the
order of floating-point sums, so it is fixed (``--threads``) and recorded in the card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from chatglm.mini import MINI_DIR, card, corpus, tokenizer
from chatglm.mini.objectives import Examples, Mix, Specials
from chatglm.mini.pretrain import Schedule, Stream, pretrain
from chatglm.tokenization_chatglm import ChatGLMTokenizer
from glmft.tasks.triples import DEFAULT_PROMPT

PROMPTED = "spo_0 texts"  # the source whose copy examples may start with the extraction prompt
WEIGHTS = {"spo_0 texts": 0.5, "d2q_0 documents": 0.25, "adgen train contents": 0.15, "tnews train headlines": 0.1}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--output_dir", type=Path, default=MINI_DIR)
    p.add_argument("--data_dir", type=Path, default=corpus.SHARED_DATA, help="the shared data root")
    p.add_argument("--vocab_size", type=int, default=4000, help="sentencepiece pieces, specials and bytes included")
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--inner_hidden_size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps trained")
    p.add_argument("--schedule_steps", type=int, default=5000,
                   help="steps the warm-up and cosine decay are laid out for (0: --steps); a run with --steps below "
                   "it is the longer run stopped early, bit for bit")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mix", default="1,1,1", help="shares of infill, continuation, copy")
    p.add_argument("--out_init_scale", type=float, default=10.0,
                   help="multiply the initial output matrices of attention and MLP by this (see scale_outputs)")
    p.add_argument("--copy_whole_clauses", action=argparse.BooleanOptionalAction, default=True,
                   help="copy examples ask for whole clauses instead of random 2-8-character spans")
    p.add_argument("--max_chars", type=int, default=360,
                   help="longest window of a text one example sees (longer texts are cut at a random place)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (fixed: the order of float sums, so the result's bytes, depends on it)")
    p.add_argument("--snapshot_every", type=int, default=0, help="also save the model every N steps (experiments)")
    return p.parse_args(argv)


def model_config(tok: ChatGLMTokenizer, args: argparse.Namespace) -> ChatGLMConfig:
    return ChatGLMConfig(
        vocab_size=-(-tok.vocab_size // 64) * 64,  # rounded up like the real model's; the extra rows have no piece
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        inner_hidden_size=args.inner_hidden_size, max_sequence_length=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id,
        gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id,
    )


def build_tokenizer(texts: corpus.Corpus, args: argparse.Namespace) -> ChatGLMTokenizer:
    # The prompt is given as often as the triples texts it precedes in fine-tuning, so its words become pieces.
    lines = [tokenizer.spell(t) for t in texts.all()] + [DEFAULT_PROMPT] * len(texts.texts[PROMPTED])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.write(tokenizer.train(lines, args.vocab_size), args.output_dir)
    return ChatGLMTokenizer.from_pretrained(args.output_dir)


def scale_outputs(model: ChatGLMForConditionalGeneration, factor: float) -> None:
    """GLM's residual adds the *normalised* input times sqrt(2 * 28) = 7.5 (see modeling_chatglm.RESIDUAL_ALPHA), so
    with the usual N(0, 0.02) init each sublayer adds about 5 % to a stream it cannot outgrow for thousands of
    steps; a larger init of the two matrices that write into the stream lets a 4-layer model use its layers early."""
    with torch.no_grad():
        for layer in model.transformer.layers:
            layer.attention.dense.weight.mul_(factor)
            layer.mlp.dense_4h_to_h.weight.mul_(factor)


def save_snapshot(model: ChatGLMForConditionalGeneration, output_dir: Path, step: int) -> None:
    """A loadable model directory of the weights at ``step`` (for the pretraining-loss vs fine-tuning curve)."""
    target = output_dir / "snapshots" / f"step-{step}"
    model.save_pretrained(target)
    for name in ("ice_text.model", "tokenizer_config.json"):
        (target / name).write_bytes((output_dir / name).read_bytes())
    model.train()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    start = time.perf_counter()
    texts = corpus.load(args.data_dir)  # first: without the data, fail before anything is changed or written
    torch.set_num_threads(args.threads)
    tok = build_tokenizer(texts, args)
    torch.manual_seed(args.seed)
    model = ChatGLMForConditionalGeneration(model_config(tok, args))
    scale_outputs(model, args.out_init_scale)
    specials = Specials(tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id)
    mix = Mix(*map(float, args.mix.split(",")), whole_clauses=args.copy_whole_clauses)
    examples = Examples(tok, specials, mix, max_chars=args.max_chars, prompt=DEFAULT_PROMPT)
    stream = Stream(texts.texts, WEIGHTS, examples, args.seed, args.batch_size, prompted=PROMPTED)
    planned = args.schedule_steps or args.steps
    schedule = Schedule(steps=planned, stop=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup=max(1, planned // 30))

    def snapshot(step: int) -> None:
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.steps:
            save_snapshot(model, args.output_dir, step)

    curve = pretrain(model, stream, schedule, tok.pad_token_id, on_step=snapshot)
    model.save_pretrained(args.output_dir)
    minutes = (time.perf_counter() - start) / 60
    (args.output_dir / "README.md").write_text(card.render(model, tok, texts, args, WEIGHTS, curve), encoding="utf-8")
    (args.output_dir / "pretraining_curve.json").write_text(json.dumps(curve) + "\n", encoding="utf-8")
    print(f"wrote {args.output_dir}: {model.num_parameters():,} parameters, final loss {curve[-1][1]:.3f}, "
          f"{minutes:.1f} min on {args.threads} threads")


if __name__ == "__main__":
    main()
