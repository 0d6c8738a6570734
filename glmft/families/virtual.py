"""Input-level virtual tokens (prompt tuning, P-Tuning v1) for every family: trainable embeddings placed before each
sequence's first real token, through the model's own ``input_ids`` path, so ``generate``, its cache, left padding
and the loss all stay the model's.

Why not PEFT's prompt-learning model: measured with peft 0.21.2 on transformers 5.24, it calls the model with
``inputs_embeds`` only (ChatGLM v1 reads its bidirectional context and 2D positions from ``[gMASK]``/``<sop>`` in
``input_ids``: peft#544, #818), re-inserts the virtual tokens at every cached decoding step (wrong tokens), and
fails on left-padded batches. PEFT still computes the virtual embeddings: its ``PromptEmbedding`` and
``PromptEncoder`` are the ``prompt_encoder`` attached here (glmft.tuners.prompt_tuning, p_tuning).

The mechanism, a forward pre-hook on the model (so ``generate`` goes through it too):

* a forward that starts a sequence (no cache, or an empty one) gets the ``V`` virtual embeddings inserted at each
  row's first real token (after its left pads, so a padded row lays out as ``pads, virtual, tokens`` and reads as
  the same row unpadded); the attention mask gets ``V`` ones there and the labels ``V`` ignored positions;
* a cached step (the cache already holds the virtual tokens) only gets the ``V`` ones in its mask;
* positions: the family decides (``virtual_forward_args``): transformers' models count them over the extended mask
  (virtual tokens 0..V-1, real tokens from V, pads ignored); ChatGLM v1 gets placeholder ids for the virtual tokens
  so it builds its own 2D positions and bidirectional mask with the virtual tokens in the context.

A post-hook drops the virtual positions from the returned logits, so they line up with ``input_ids`` as without
the method (a ``logits_to_keep`` cut is left as it is).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from glmft.families.base import IGNORE_INDEX
from glmft.families.prefix import takes_positions


def attach(model: nn.Module, encoder: nn.Module, count: int) -> nn.Module:
    """Give ``model`` the trainable ``prompt_encoder`` (called with ``[b, V]`` token indices, returning ``[b, V,
    hidden]``) and the hooks that place its output; ``config.num_virtual_tokens`` records ``V``."""
    if getattr(model, "prompt_encoder", None) is not None:
        raise ValueError("the model already has virtual tokens; apply the method to a fresh model")
    from glmft import families  # the family package imports this module

    model.prompt_encoder = encoder
    model.config.num_virtual_tokens = count
    # looked up once: finding the family reads the whole config, too much for every decoding step
    model._virtual_forward_args = families.of_model(model).virtual_forward_args
    model.register_forward_pre_hook(_with_virtual, with_kwargs=True)
    model.register_forward_hook(_drop_virtual, with_kwargs=True)
    return model


def spliced(x: torch.Tensor, extra: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
    """``x`` ``[b, s, ...]`` with ``extra`` ``[b, V, ...]`` inserted at index ``lead[r]`` of each row r."""
    b, s = x.shape[:2]
    count = extra.shape[1]
    j = torch.arange(s + count, device=x.device).expand(b, -1)
    start = lead[:, None]
    virtual = (j >= start) & (j < start + count)
    from_x = torch.where(j < start, j, j - count).clamp(0, s - 1)
    from_extra = (j - start).clamp(0, count - 1)
    tail = x.shape[2:]
    pick_x = x.gather(1, from_x.view(b, -1, *([1] * len(tail))).expand(-1, -1, *tail))
    pick_extra = extra.gather(1, from_extra.view(b, -1, *([1] * len(tail))).expand(-1, -1, *tail))
    return torch.where(virtual.view(b, -1, *([1] * len(tail))), pick_extra, pick_x)


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first unmasked column (left pads come before it)."""
    return mask.int().argmax(dim=1)


def _with_virtual(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:  # positional arguments by their names in the model's forward (input_ids, attention_mask, ...)
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        kwargs = {**bound.pop("kwargs", {}), **bound}
    ids = kwargs.get("input_ids")
    if ids is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError("a model with virtual tokens takes input_ids (the virtual embeddings are placed among "
                         "their embeddings), not inputs_embeds")
    count = model.config.num_virtual_tokens
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    batch, length = ids.shape
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = ids.new_ones(batch, (past - count if past else 0) + length)
    if mask.dim() != 2:
        raise ValueError("a model with virtual tokens takes a 2-D attention mask (1 real, 0 pad)")
    lead = first_real(mask)
    ones = mask.new_ones(batch, count)
    first = past == 0
    extended = {"mask": spliced(mask, ones, lead)}
    if first:
        indices = torch.arange(count, device=ids.device).expand(batch, -1)
        embeds = model.get_input_embeddings()(ids)
        virtual = model.prompt_encoder(indices).to(embeds.dtype)
        extended["embeds"] = spliced(embeds, virtual, lead)
        extended["ids"] = spliced(ids, ids.new_full((batch, count), model.config.pad_token_id or 0), lead)
        if kwargs.get("labels") is not None:
            kwargs["labels"] = spliced(kwargs["labels"], kwargs["labels"].new_full((batch, count), IGNORE_INDEX), lead)
    kwargs.update(model._virtual_forward_args(model, extended, kwargs.get("position_ids"), count, length, first))
    model._virtual_layout = (lead, extended["mask"].shape[-1]) if first else None  # for the post-hook
    return (), kwargs


def _drop_virtual(model: nn.Module, args: tuple, kwargs: dict, output):
    layout, model._virtual_layout = getattr(model, "_virtual_layout", None), None
    logits = getattr(output, "logits", None)
    if layout is None or logits is None:
        return output
    (lead, ext_len), count = layout, model.config.num_virtual_tokens
    if logits.shape[1] != ext_len:  # logits_to_keep kept only the last positions: they are real tokens
        return output
    j = torch.arange(ext_len, device=logits.device)
    real = (j[None] < lead[:, None]) | (j[None] >= lead[:, None] + count)
    output.logits = logits[real].view(logits.shape[0], ext_len - count, *logits.shape[2:])
    return output


def position_ids_over(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions counted over the real and virtual tokens of ``mask`` (pads take the position before them), for the
    last ``length`` columns."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def standard_forward_args(model: nn.Module, extended: dict, position_ids, count: int, length: int, first: bool) -> dict:
    """transformers' causal LMs: the embeddings with the virtual tokens, the extended mask, and positions counted over
    it (``position_ids`` from ``generate`` count the real tokens only; models without positions, such as bloom's
    ALiBi, count from the mask themselves)."""
    out = {"attention_mask": extended["mask"]}
    if first:
        out.update(input_ids=None, inputs_embeds=extended["embeds"])
    if takes_positions(model):
        out["position_ids"] = position_ids_over(extended["mask"], length + (count if first else 0))
    return out
