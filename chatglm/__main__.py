"""Quick manual check of a model directory: ``python -m chatglm --model_dir /models/chatglm-6b 你好``.

Every family the fine-tuning scripts take: ChatGLM-6B (v1), ChatGLM2-6B and ChatGLM3-6B (each with its own prompt
format and stop tokens, as the original ``chat``), and any transformers causal LM (its tokenizer's chat template,
else the query alone). ``--model_dir tiny`` (the default) uses the bundled random tiny model, whose replies are
noise by design; ``mini`` is pretrained but not a chat model.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatglm import ChatGLM2ForCausalLM, ChatGLMForConditionalGeneration, ChatGLMTokenizer, resolve_model_dir
from chatglm.chatglm2 import is_chatglm2_config
from chatglm.tokenization_chatglm2 import tokenizer_class_for


def load(path, dtype: torch.dtype):
    """(model, tokenizer, chat function) for the directory's family."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") == "chatglm" and is_chatglm2_config(config):
        model = ChatGLM2ForCausalLM.from_pretrained(path, dtype=dtype)
        return model, tokenizer_class_for(path).from_pretrained(path), model.chat
    if config.get("model_type") == "chatglm":
        model = ChatGLMForConditionalGeneration.from_pretrained(path, dtype=dtype)
        return model, ChatGLMTokenizer.from_pretrained(path), model.chat
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path), lambda *a, **k: template_chat(model, *a, **k)


@torch.inference_mode()
def template_chat(model, tokenizer, query: str, history: list | None = None, max_length: int = 256,
                  do_sample: bool = False, **generate_kwargs):
    """One turn with the tokenizer's chat template (history: ``{"role", "content"}`` messages); without a template
    the query alone is the prompt and the history is not shown to the model."""
    history = list(history or [])
    messages = history + [{"role": "user", "content": query}]
    kept = list(history)
    while True:  # as v1's chat: the oldest turns leave the prompt while it takes over 3/4 of max_length
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(kept + messages[-1:], tokenize=False, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(query)
        if not kept or len(ids) <= max_length - max(1, max_length // 4):
            break
        kept = kept[2:]
    if len(ids) >= max_length:
        raise ValueError(f"chat: the query alone is {len(ids)} tokens, max_length={max_length} leaves no room for a "
                         "reply: raise max_length")
    inputs = torch.tensor([ids], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_length=max_length,
                            do_sample=do_sample, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                            **generate_kwargs)
    reply = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
    return reply, messages + [{"role": "assistant", "content": reply}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("queries", nargs="*", default=["你好"], help="one chat turn per query, in order")
    parser.add_argument("--model_dir", default="tiny", help="a local model directory, or 'tiny' / 'mini'")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--max_length", type=int, default=256,
                        help="tokens per turn, prompt and reply; the oldest turns leave the prompt to make room (v1)")
    parser.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()

    path = resolve_model_dir(args.model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = torch.float16 if device == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer, chat = load(path, dtype)
    model = model.to(device).eval()
    print(f"{path}: {type(model).__name__}, {model.num_parameters():,} parameters, {dtype}, {device}")
    history: list = []
    for query in args.queries:
        reply, history = chat(tokenizer, query, history, max_length=args.max_length, do_sample=args.do_sample)
        print(f"问：{query}\n答：{reply}")


if __name__ == "__main__":
    main()
