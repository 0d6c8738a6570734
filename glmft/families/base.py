"""What the family modules share: cutting a source to its token budget and laying out prompt + answer."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value the loss skips


def build_own(model_class, path, dtype: torch.dtype, overrides: dict, meta: bool):
    """One of our model classes (``chatglm/``): from config.json alone on the meta device (dry runs), else with its
    weights; ``overrides`` are config fields (``pre_seq_len``, ``quantization_bit``, ...)."""
    if meta:
        with torch.device("meta"):
            return model_class(model_class.config_class.from_pretrained(path, **overrides)).to(dtype)
    return model_class.from_pretrained(path, dtype=dtype, **overrides)


def source_ids(tokenizer, text: str, limit: int) -> tuple[list[int], bool]:
    """The text's ids without special tokens, cut to ``limit`` (the start is kept: it holds the task's prompt)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:limit], len(ids) > limit


def cut_text(tokenizer, text: str, limit: int) -> tuple[str, bool]:
    """The text cut to ``limit`` tokens, as text: for layouts that tokenize a whole template string (a template's
    pieces tokenized one by one would get a sentencepiece word-start mark at each seam)."""
    ids, cut = source_ids(tokenizer, text, limit)
    return (tokenizer.decode(ids) if cut else text), cut


def layout(prompt: list[int], target: list[int], end: int, max_len: int, label_prompt_end: bool,
           ) -> tuple[list[int], list[int], bool]:
    """``prompt + target + [end]`` and its labels (the prompt masked; its last token labelled where the family
    says so), the target cut to fit ``max_len``; a cut target gets no end token, so the model never learns to stop
    where the cut happened to fall. Returns (input_ids, labels, target_cut); ValueError if no answer token fits."""
    room = max_len - len(prompt) - 1
    if room < 1:
        raise ValueError(f"the prompt takes {len(prompt)} tokens with the model's template: max_len {max_len} leaves "
                         "no room for the answer (raise max_len or lower max_src_len)")
    cut = len(target) > room
    answer = [*target[:room]] + ([] if cut else [end])
    masked = len(prompt) - (1 if label_prompt_end else 0)
    return [*prompt, *answer], [IGNORE_INDEX] * masked + prompt[masked:] + answer, cut


def layer_list_path(model, count: int) -> str:
    """The qualified name of the ModuleList holding the model's ``count`` transformer layers (the deepest one of that
    length whose children all share a class)."""
    found = [name for name, module in model.named_modules()
             if module.__class__.__name__ == "ModuleList" and len(module) == count
             and len({type(m) for m in module}) == 1]
    if not found:
        raise ValueError(f"{type(model).__name__}: no list of {count} transformer layers found")
    return max(found, key=len)
