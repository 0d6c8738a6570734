"""Batched generation for prediction, optionally restricted to a fixed set of strings (``--constrain_labels``).

The restriction: a prefix trie over the labels' token ids, encoded exactly as training encodes a target, answers
``prefix_allowed_tokens_fn``: after the tokens generated so far, the next one must continue some label, and <eop> is
allowed (then forced) once a whole label has been written. Every output is therefore one of the labels, provided the
generation may run for ``longest + 1`` tokens, which is why prediction sets ``max_new_tokens`` to exactly that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor

from chatglm.modeling_chatglm import SafeScoresProcessor


class LabelTrie:
    def __init__(self, tokenizer, labels: Sequence[str]) -> None:
        self.eos = tokenizer.eos_token_id
        self.root: dict[int, dict] = {}
        self.longest = 0
        for label in labels:
            ids = tokenizer.encode(label, add_special_tokens=False)
            # The guarantee holds only if decoding a label's tokens gives the label back (as predict strips it).
            if not ids or tokenizer.decode(ids, skip_special_tokens=True).strip() != label:
                raise ValueError(f"label {label!r} does not survive the tokenizer's round trip (decodes to "
                                 f"{tokenizer.decode(ids, skip_special_tokens=True)!r}): it cannot be generated")
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            node[self.eos] = {}  # <eop> as a child marks the end of a label
            self.longest = max(self.longest, len(ids))

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """The token ids that may follow ``generated`` (never empty: ``generate`` refuses an empty list)."""
        node = self.root
        for token in generated:
            if token not in node:  # past the end of a label (padding of a finished row): only <eop>
                return [self.eos]
            node = node[token]
        return list(node) or [self.eos]

    def prefix_fn(self, start: int) -> Callable[[int, torch.Tensor], list[int]]:
        """``prefix_allowed_tokens_fn`` for a batch whose (left-padded) prompts are ``start`` tokens wide."""

        def allowed_tokens(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            return self.allowed(input_ids[start:].tolist())

        return allowed_tokens


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, constraint: LabelTrie | None = None,
             **gen_kwargs) -> tuple[list[list[int]], list[int]]:
    """New tokens per prompt, in input order, and per prompt the generation steps whose scores held a NaN/inf
    (summed over its beams). Prompts are batched by length (less padding); a batch gives the same tokens as one
    prompt at a time, so the order does not change any output. ``constraint``: only its label strings."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    nonfinite = [0] * len(prompts)
    safe = SafeScoresProcessor(tokenizer)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="predict", unit="batch", dynamic_ncols=True):
        chunk = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in chunk]}, return_tensors="pt").to(device)
        safe.reset()
        processors = [safe]
        if constraint is not None:
            # What generate(prefix_allowed_tokens_fn=...) builds, placed after SafeScoresProcessor: passed through
            # generate, it would run first and its -inf mask would read as a numerical failure there.
            width, beams = batch["input_ids"].shape[1], gen_kwargs.get("num_beams", 1)
            processors.append(PrefixConstrainedLogitsProcessor(constraint.prefix_fn(width), beams))
        out = model.generate(**batch, logits_processor=LogitsProcessorList(processors),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
        counted = safe.nonfinite_steps  # None if generate() never scored a token
        steps = counted.view(len(chunk), -1).sum(dim=1).tolist() if counted is not None else [0] * len(chunk)
        for i, row, bad in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), steps, strict=True):
            end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            outputs[i] = [t for t in row[:end] if t != tokenizer.pad_token_id]
            nonfinite[i] = bad
    return outputs, nonfinite
