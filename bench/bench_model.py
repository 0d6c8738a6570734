"""Speed of the model on a small config: training-step and greedy-generation tokens/s, SDPA vs the eager path.

    python bench/bench_model.py                 # 4 layers, hidden 512, 8 heads, inner 2048, batch 2, seq 512, fp32
    python bench/bench_model.py --vocab_size 130528 --answer_fraction 1.0

A script that prints numbers, not a test. The training step is forward + backward with labels laid out as
fine-tuning data is (-100 on the prompt, the answer labelled); ``--answer_fraction 1.0`` labels every position.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--inner", type=int, default=2048)
    p.add_argument("--vocab_size", type=int, default=130528, help="the real vocabulary by default")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--answer_fraction", type=float, default=0.4, help="share of positions that carry labels")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--new_tokens", type=int, default=32, help="greedy tokens generated per sequence")
    p.add_argument("--gen_prompt", type=int, default=128, help="prompt length for the generation benchmark")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    return p.parse_args()


def make_batch(config: ChatGLMConfig, batch: int, seq: int, answer_fraction: float):
    """Random text, then [gMASK] <sop> and an answer, as the fine-tuning data lays it out."""
    g = torch.Generator().manual_seed(0)
    answer = min(seq - 2, max(1, int(seq * answer_fraction)))  # 1.0: [gMASK] <sop> first, every later token labelled
    ids = torch.randint(10, min(config.vocab_size, 130000), (batch, seq), generator=g)
    ctx = seq - answer
    ids[:, ctx - 2] = config.gmask_token_id
    ids[:, ctx - 1] = config.bos_token_id
    labels = ids.clone()
    labels[:, : ctx - 1] = -100
    return ids, labels


def time_training(model, ids, labels, steps: int) -> float:
    """Median seconds of a training step (forward with labels + backward) after one warm-up step."""
    model.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(ids, labels=labels, logits_to_keep=1).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.inference_mode()
def time_generation(model, ids, new_tokens: int) -> float:
    model.eval()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=3)
    model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ChatGLMConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        inner_hidden_size=args.inner, vocab_size=args.vocab_size, max_sequence_length=4096,
    )
    ids, labels = make_batch(config, args.batch, args.seq, args.answer_fraction)
    gen_ids = make_batch(config, args.batch, args.gen_prompt, 0.01)[0]
    print(f"config: layers {args.layers}, hidden {args.hidden}, heads {args.heads}, inner {args.inner}, "
          f"vocab {args.vocab_size}; batch {args.batch} x seq {args.seq}, labelled share {args.answer_fraction}; "
          f"fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        config._attn_implementation = impl
        model = ChatGLMForConditionalGeneration(config)
        step = time_training(model, ids, labels, args.steps)
        gen = time_generation(model, gen_ids, args.new_tokens)
        results[impl] = step
        train_tps = args.batch * args.seq / step
        gen_tps = args.batch * args.new_tokens / gen
        print(f"{impl:>5}: training step {step:7.3f} s  ({train_tps:8.1f} tokens/s)   "
              f"greedy generation {gen_tps:7.1f} tokens/s (prompt {args.gen_prompt}, {args.new_tokens} new)")
    print(f"sdpa / eager training-step time: {results['sdpa'] / results['eager']:.2f}")


if __name__ == "__main__":
    main()
