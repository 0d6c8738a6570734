"""The optimizer's parameter groups: weight decay for matrices only.

Decay pulls a weight towards 0 by ``lr * weight_decay`` of itself every step. That is meant for the matrices of
linear layers; on a bias, a layernorm scale, an embedding row or the P-Tuning prefix it only erases what was
learned (the prefix, at lr 1e-2 and decay 0.1, would shrink by 1e-3 a step whether or not it helps the loss).
"""

from __future__ import annotations

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
