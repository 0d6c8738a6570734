"""P-Tuning v2 (prefix tuning) for transformers' own causal LMs: PEFT's prefix encoder computes the per-layer
keys/values (``peft.tuners.prefix_tuning.PrefixEncoder``: the same parameters as PEFT's prefix tuning, so the
counts are PEFT's), and ChatGLM2's mechanism hands them to the model (``chatglm/chatglm2``'s read-only
``PrefixCache``), attached to a loaded model.

Why not PEFT's prefix tuning as a whole: measured with peft 0.21.2 on transformers 5.24, ``generate`` ignores it
(PEFT passes the cache under the argument name transformers 5 renamed), and left-padded batches fail. Here the prefix
rides on the model's own cache argument, as it does for ChatGLM2, so training, ``generate`` with the cache, left
padding and gradient checkpointing see one code path. Before each forward (a pre-hook, so ``generate`` goes through
it too): an empty cache gets the ``pre_seq_len`` prefix keys/values of every layer first; the 2-D attention mask gets
``pre_seq_len`` ones in front; rotary models get positions counted from the first real token (the prefix has no
position). ALiBi models (bloom) count key positions from the mask, prefix included: every real key moves by the same
``pre_seq_len``, a constant per query that softmax ignores, so the real tokens' attention is as without a prefix.
A model whose forward takes no transformers ``cache`` is refused.
"""

from __future__ import annotations

import inspect

import torch
from peft import PrefixTuningConfig, TaskType
from peft.tuners.prefix_tuning import PrefixEncoder
from torch import nn
from transformers.cache_utils import DynamicCache

from chatglm.chatglm2 import PrefixCache
from glmft.families.base import layer_list_path


def supports_prefix(model: nn.Module) -> bool:
    """A decoder whose forward takes a transformers cache (``cache``)."""
    return "cache" in inspect.signature(model.forward).parameters


def takes_positions(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head


def attach(model: nn.Module, pre_seq_len: int, projection: bool) -> nn.Module:
    """Give ``model`` a trainable prefix encoder (``model.prefix_encoder``, PyTorch's default init) and the hooks
    that hand its keys/values to every forward; ``config.pre_seq_len``/``prefix_projection`` record it."""
    layers, heads, head = kv_shape(model.config)
    # token_dim: the width of one layer's keys (of its values), key/value heads x head size (the hidden size
    # without grouped-query attention); the projection MLP's inner width is the hidden size, PEFT's default.
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=pre_seq_len, token_dim=heads * head,
                                num_layers=layers, num_attention_heads=model.config.num_attention_heads,
                                encoder_hidden_size=model.config.hidden_size, prefix_projection=projection)
    like = model.get_input_embeddings().weight
    with torch.device(like.device):
        model.prefix_encoder = PrefixEncoder(config).to(like.dtype)
    model.config.pre_seq_len, model.config.prefix_projection = pre_seq_len, projection
    for layer in model.get_submodule(layer_list_path(model, layers)):
        layer._can_checkpoint_with_cache = True  # the read-only PrefixCache is safe under gradient checkpointing
    model.register_forward_pre_hook(_with_prefix, with_kwargs=True)
    model.register_forward_hook(_drop_prefix_cache)
    return model


def prefix_key_values(model: nn.Module, batch: int) -> torch.Tensor:
    """``[2 * layers, b, heads, P, d]``: layer l's keys at row 2l, values at 2l + 1."""
    layers, heads, head = kv_shape(model.config)
    pre = model.config.pre_seq_len
    ids = torch.arange(pre, device=model.prefix_encoder.embedding.weight.device).expand(batch, -1)
    kv = model.prefix_encoder(ids).to(model.get_input_embeddings().weight.dtype)
    return kv.view(batch, pre, 2 * layers, heads, head).permute(2, 0, 3, 1, 4)


def _with_prefix(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    batch, length = (ids if ids is not None else embeds).shape[:2]
    pre = model.config.pre_seq_len
    use_cache = kwargs.get("use_cache")
    use_cache = model.config.use_cache if use_cache is None else use_cache
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or cache.get_seq_length() == 0:
        writable = use_cache and not (model.training and model.is_gradient_checkpointing)
        cache = cache if cache is not None and writable else (DynamicCache if writable else PrefixCache)()
        kv = prefix_key_values(model, batch)
        for layer in range(model.config.num_hidden_layers):
            DynamicCache.update(cache, kv[2 * layer], kv[2 * layer + 1], layer)
    past = cache.get_seq_length() - pre  # real tokens already cached
    if kwargs.get("position_ids") is None and takes_positions(model):
        kwargs["position_ids"] = torch.arange(past, past + length, device=cache.layers[0].keys.device).unsqueeze(0)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        if mask.shape[-1] == past + length:  # every token sees the whole prefix
            kwargs["attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], pre), mask), dim=-1)
        elif mask.shape[-1] != past + pre + length:
            raise ValueError(f"attention_mask has {mask.shape[-1]} columns: expected {past + length} (the tokens) or "
                             f"{past + pre + length} (with the {pre} prefix slots first)")
    kwargs.pop("past_key_values", None)
    kwargs.update(cache=cache, use_cache=use_cache)
    return args, kwargs


def _drop_prefix_cache(model: nn.Module, args, output):
    if isinstance(getattr(output, "cache", None), PrefixCache):
        output.cache = None  # nothing was cached; the next call rebuilds the prefix
    return output
