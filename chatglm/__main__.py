"""Quick manual check of a ChatGLM directory: ``python -m chatglm --model_dir /models/chatglm-6b 你好``.

``--model_dir tiny`` (the default) uses the bundled random tiny model, whose replies are noise by design.
"""

from __future__ import annotations

import argparse

import torch

from chatglm import ChatGLMForConditionalGeneration, ChatGLMTokenizer, resolve_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("queries", nargs="*", default=["你好"], help="one chat turn per query, in order")
    parser.add_argument("--model_dir", default="tiny", help="a local ChatGLM-6B directory, or 'tiny'")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--max_length", type=int, default=256,
                        help="tokens per turn, prompt and reply; the oldest turns leave the prompt to make room")
    parser.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()

    path = resolve_model_dir(args.model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = torch.float16 if device == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = ChatGLMTokenizer.from_pretrained(path)
    model = ChatGLMForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    print(f"{path}: {model.num_parameters():,} parameters, {dtype}, {device}")
    history: list[tuple[str, str]] = []
    for query in args.queries:
        reply, history = model.chat(tokenizer, query, history, max_length=args.max_length, do_sample=args.do_sample)
        print(f"问：{query}\n答：{reply}")


if __name__ == "__main__":
    main()
