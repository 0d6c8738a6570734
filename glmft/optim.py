"""The optimizer's parameter groups (weight decay for matrices only), and what a per-step hook needs of its state.

Decay pulls a weight towards 0 by ``lr * weight_decay`` of itself every step. That is meant for the matrices of
linear layers; on a bias, a layernorm scale, an embedding row or the P-Tuning prefix it only erases what was
learned (the prefix, at lr 1e-2 and decay 0.1, would shrink by 1e-3 a step whether or not it helps the loss).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

NO_DECAY_MODULES = ("prefix_encoder",)  # P-Tuning: the prefix is an embedding, its projection feeds only it


def no_decay_ids(model: nn.Module) -> set[int]:
    """ids of the tensors that must not decay: 1-D ones (biases, norms), embeddings, the prefix encoder."""
    ids = {id(p) for p in model.parameters() if p.ndim < 2}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.rsplit(".", 1)[-1] in NO_DECAY_MODULES:
            ids.update(id(p) for p in module.parameters())  # a tied output layer shares its tensor: caught too
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters as AdamW groups, decayed ones first; empty groups are left out (ZeRO cannot
    flatten an empty group)."""
    skip = no_decay_ids(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # each shared tensor once
    groups = [{"params": [p for p in trainable if id(p) not in skip], "weight_decay": weight_decay},
              {"params": [p for p in trainable if id(p) in skip], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def describe(groups: list[dict], weight_decay: float) -> str:
    """For the run header: ``decay 0.1: 4 tensors / 12,288 values, no decay: 2 tensors / 128 values``."""
    def size(decayed: bool) -> str:
        params = [p for g in groups if (g["weight_decay"] > 0) == decayed for p in g["params"]]
        return f"{len(params)} tensors / {sum(p.numel() for p in params):,} values"

    return f"decay {weight_decay:g}: {size(True)}, no decay: {size(False)}"


# A tuner's per-step hook (AdaLoRA's rank allocation) reads gradients and changes parameters between the last backward
# of a step and DeepSpeed's step(). Under ZeRO-1/2 (and bf16 without ZeRO) the gradients then sit in the optimizer's
# buffers (``.grad`` is None) and the optimizer steps an fp32 master copy of each parameter, which it copies back over
# the module's tensor: DeepSpeed's per-parameter ``safe_*`` helpers reach both (through ``param._hp_mapping``, set
# on every rank; the ``get`` ones all-reduce, so every rank calls them for the same parameters in the same order).
# Without ZeRO in fp32 the optimizer steps the module's tensors themselves: the helpers return ``.grad`` and no master.


@contextmanager
def full_grads(params: list[nn.Parameter]) -> Iterator[bool]:
    """Each parameter's whole gradient as its ``.grad`` for the block, its own ``.grad`` back afterwards; yields
    whether every gradient exists and is finite (an overflowed fp16 step, which DeepSpeed skips, is not)."""
    from deepspeed.utils import safe_get_full_grad

    if any(hasattr(p, "ds_id") for p in params):
        raise ValueError("a per-step hook that reads whole adapter tensors (AdaLoRA's rank allocation) cannot run "
                         "under ZeRO-3, which partitions each tensor across ranks: use ZeRO-1 or 2 (ds_config.json, "
                         "ds_zero2.json)")
    saved = [p.grad for p in params]
    grads = [safe_get_full_grad(p) for p in params]
    usable = all(g is not None for g in grads) and _all_finite(grads)
    try:
        if usable:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(p.dtype)
        yield usable
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync for all of them."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def write_master(params: list[nn.Parameter], before: list[torch.Tensor]) -> None:
    """Give the optimizer the entries of ``params`` that changed in place since ``before`` (their values then),
    so its next step starts from them; its master copy keeps its precision everywhere else."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for p, old in zip(params, before, strict=True):
        master = safe_get_full_fp32_param(p)
        if master is None:  # no master copy: the optimizer steps this tensor itself
            if p.dtype != torch.float32:
                raise ValueError("a parameter changed by a per-step hook is half precision with no fp32 master copy "
                                 "the hook can reach (DeepSpeed's fp16 optimizer without ZeRO): use ZeRO-1 or 2")
            continue
        with torch.no_grad():
            safe_set_full_fp32_param(p, torch.where(p != old, p.float(), master))
