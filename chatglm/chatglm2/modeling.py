"""ChatGLM2-6B / ChatGLM3-6B as transformers' ``GlmForCausalLM`` plus what it lacks.

The network is transformers' own: measured on the fixtures made by the original code (``shared/spec/
chatglm2_on_glm.md``), GlmForCausalLM computes ChatGLM2/3's fp32 function once the tensors are renamed and split
(``convert.py`` says which tensor goes where). This file adds only:
- loading an official checkpoint directory (``pytorch_model*.bin`` shards or safetensors, official names) and saving
  under the official names again;
- THUDM's P-Tuning v2 prefix (``transformer.prefix_encoder.*``, ``pre_seq_len`` / ``prefix_projection``), handed
  to every layer as the first ``pre_seq_len`` entries of a transformers cache;
- the INT4/INT8 layout of ``THUDM/chatglm2-6b-int4``: ``quantized.py``, on ``chatglm/quantization.py``;
- ``chat()``, with each release's prompt format and stop tokens, for a quick manual check.

Kept from GlmModel, not from the original (see the spec): a padding query row attends to nothing rather than to
every key (those rows never feed a real token); ``hidden_states[-1]`` is after the final norm. In half precision
the rotary table is ChatGLM3's for both models (angles in fp32, then cast; the frequencies stay fp32 through
``.half()``), not ChatGLM2's, which rounds positions and angles in fp16/bf16 (wrong by up to ~0.5 rad near
position 1000): a ChatGLM2 model fine-tuned here in fp16 sees correct angles. In fp32 all agree exactly.
Glm's embedding ``padding_idx`` is removed: the original's embedding has none, so id 0 gets its gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GlmForCausalLM, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding
from transformers.utils.deprecation import deprecate_kwarg

from ..modeling_chatglm import SafeScoresProcessor, torch_default_init
from ..quantization import QuantizedLinear
from .configuration import ChatGLM2Config
from .convert import GLM_PREFIX, official_to_glm
from .loading import load_official, read_official, save_official
from .quantized import quantized_like, replace_linears


class PrefixEncoder(nn.Module):
    """P-Tuning v2: per-layer past keys/values for ``pre_seq_len`` virtual tokens, THUDM's layout and key names."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        kv_size = config.num_layers * config.kv_channels * config.multi_query_group_num * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if config.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )
        for layer in self.modules():
            layer._torch_default_init = True  # see ChatGLM2ForCausalLM._init_weights

    def forward(self, prefix_ids: torch.Tensor) -> torch.Tensor:
        prefix = self.embedding(prefix_ids)
        return self.trans(prefix) if hasattr(self, "trans") else prefix  # [b, P, 2 * L * groups * d]


class PrefixCache(DynamicCache):
    """A cache that holds only the prefix: ``update`` returns ``cat(prefix, new)`` and stores nothing.

    Used when no cache is wanted (training): a forward pass recomputed by gradient checkpointing then reads the same
    prefix, where a DynamicCache would have grown on the first pass (and transformers drops a writable cache inside
    checkpointed layers).
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat((layer.keys, key_states), dim=-2), torch.cat((layer.values, value_states), dim=-2)


class ChatGLM2RotaryEmbedding(GlmRotaryEmbedding):
    """Glm's rotary embedding with its frequencies kept in fp32 through ``module.half()`` / ``.bfloat16()`` (what
    DeepSpeed does to the whole module): ChatGLM3 builds theta in fp32 whatever the model dtype, and a bf16
    ``inv_freq`` would move angles by radians at long positions. ``from_pretrained(dtype=...)`` keeps fp32 anyway."""

    def _apply(self, fn, recurse: bool = True):
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)  # moved, never cast
        return self


class ChatGLM2ForCausalLM(GlmForCausalLM):
    """ChatGLM2/3 (``model_type: chatglm`` with the v2 fields) on ``GlmForCausalLM``."""

    config_class = ChatGLM2Config
    config: ChatGLM2Config
    _tied_weights_keys = {}

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        # Glm's embedding zeroes the gradient of the pad id's row; the original's has no padding_idx (same forward).
        self.model.embed_tokens.padding_idx = None
        self.model.rotary_emb = ChatGLM2RotaryEmbedding(config)
        if config.quantization_bit:  # empty INT4/INT8 layers, filled from a quantized checkpoint
            replace_linears(self, lambda linear: quantized_like(linear, config.quantization_bit, linear.weight.device))
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(config.prefix_dropout)
        if config.pre_seq_len:
            for layer in self.model.layers:  # the PrefixCache is read-only: safe to keep under checkpointing
                layer._can_checkpoint_with_cache = True
            self.prefix_encoder.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, QuantizedLinear):
            return  # integers and scales only ever come from a checkpoint
        if not getattr(module, "_torch_default_init", False):
            super()._init_weights(module)
        else:  # the prefix encoder, at PyTorch's defaults as in the original
            torch_default_init(module)

    # ------------------------------------------------------------------------------------------------------------
    # P-Tuning v2 prefix
    # ------------------------------------------------------------------------------------------------------------
    def prefix_key_values(self, batch: int) -> torch.Tensor:
        """``[2 * layers, b, groups, P, d]``: layer l's keys at row 2l, values at 2l+1 (the original's view)."""
        cfg = self.config
        ids = torch.arange(cfg.pre_seq_len, device=self.prefix_encoder.embedding.weight.device).expand(batch, -1)
        kv = self.prefix_encoder(ids).to(self.model.embed_tokens.weight.dtype)  # [b, P, 2 * L * groups * d]
        kv = kv.view(batch, cfg.pre_seq_len, 2 * cfg.num_layers, cfg.multi_query_group_num, cfg.kv_channels)
        return self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)  # [2L, b, groups, P, d]

    def _prefix_inputs(self, batch: int, q_len: int, attention_mask, position_ids, cache, use_cache: bool):
        """The cache holding the prefix (filled here when empty), the mask widened by the prefix, and positions
        counted from the first real token: the prefix has no position (no rotary), as in the original."""
        pre = self.config.pre_seq_len
        if cache is None or cache.get_seq_length() == 0:
            writable = use_cache and not (self.training and self.is_gradient_checkpointing)
            cache = cache if cache is not None and writable else (DynamicCache if writable else PrefixCache)()
            kv = self.prefix_key_values(batch)
            for layer in range(self.config.num_layers):
                DynamicCache.update(cache, kv[2 * layer], kv[2 * layer + 1], layer)
        past = cache.get_seq_length() - pre  # real tokens already cached
        if position_ids is None:
            position_ids = torch.arange(past, past + q_len, device=cache.layers[0].keys.device).unsqueeze(0)
        columns = attention_mask.shape[-1] if attention_mask is not None and attention_mask.dim() == 2 else None
        if columns == past + q_len:
            ones = attention_mask.new_ones(attention_mask.shape[0], pre)  # every token sees the whole prefix
            attention_mask = torch.cat((ones, attention_mask), dim=-1)
        elif columns is not None and columns != past + pre + q_len:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns: expected {past + q_len} (the "
                             f"tokens) or {past + pre + q_len} (with the {pre} prefix slots first)")
        return attention_mask, position_ids, cache

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None, logits_to_keep=0, **kwargs):
        if self.prefix_encoder is not None:
            use_cache = self.config.use_cache if use_cache is None else use_cache
            shape = (input_ids if input_ids is not None else inputs_embeds).shape
            attention_mask, position_ids, cache = self._prefix_inputs(
                shape[0], shape[1], attention_mask, position_ids, cache, use_cache)
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                              logits_to_keep=logits_to_keep, **kwargs)
        if isinstance(cache, PrefixCache) and hasattr(out, "cache"):
            out.cache = None  # nothing was cached; the prefix is rebuilt by the next call
        return out

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: list | None = None, max_length: int = 8192,
             do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8, **generate_kwargs):
        """One chat turn as the original's ``chat``: ChatGLM2's ``[Round N]`` text with (query, reply) pairs as
        history; ChatGLM3's role tokens with ``{"role", "content"}`` messages as history, stopping at ``</s>``,
        ``<|user|>`` or ``<|observation|>``. Returns (reply, history with this turn)."""
        history = list(history or [])
        three = hasattr(tokenizer, "build_chat_input")  # ChatGLM3Tokenizer
        stop = tokenizer.chat_eos_token_ids if three else tokenizer.eos_token_id
        kept = history
        while True:  # as v1's chat: the oldest turns leave the prompt while it takes over 3/4 of max_length
            inputs = (tokenizer.build_chat_input(query, kept) if three
                      else tokenizer([tokenizer.build_prompt(query, kept)], return_tensors="pt"))
            length = inputs["input_ids"].shape[1]
            if not kept or length <= max_length - max(1, max_length // 4):
                break
            kept = kept[2:] if three else kept[1:]  # a ChatGLM3 turn is two messages
        if length >= max_length:
            raise ValueError(f"chat: the query alone is {length} tokens, max_length={max_length} leaves no room for "
                             "a reply: raise max_length")
        if do_sample:
            generate_kwargs.update(top_p=top_p, temperature=temperature)
        guard = LogitsProcessorList([SafeScoresProcessor(tokenizer)])
        output = self.generate(**inputs.to(self.device), max_length=max_length, do_sample=do_sample,
                               eos_token_id=stop, logits_processor=guard, **generate_kwargs)
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        if hasattr(tokenizer, "build_chat_input"):
            new = [t for t in new if t not in stop]
            text = tokenizer.decode(new, skip_special_tokens=True)
            metadata, _, content = text.partition("\n")  # the assistant turn opens with its metadata line
            reply = content.strip() if not metadata.strip() else text.strip()
            return reply, history + [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
        reply = tokenizer.decode(new, skip_special_tokens=True).strip()
        return reply, history + [(query, reply)]

    def load_prefix_encoder(self, source: str | dict[str, torch.Tensor]) -> None:
        """Load a THUDM P-Tuning v2 checkpoint as its ``main.py`` saves it (a directory whose ``pytorch_model.bin``
        holds only ``transformer.prefix_encoder.*``), or such a state dict; every key must match."""
        state_dict = source if isinstance(source, dict) else read_official(source, self.config)
        state_dict = {k: v for name, v in state_dict.items() for k, v in official_to_glm(name, v, self.config).items()}
        if self.prefix_encoder is None:
            raise ValueError("the model has no prefix encoder: load it with pre_seq_len (and prefix_projection)")
        foreign = sorted(k for k in state_dict if not k.startswith(GLM_PREFIX))
        if foreign:
            raise ValueError(f"not a P-Tuning v2 prefix: unexpected tensor(s) {foreign}")
        self.prefix_encoder.load_state_dict({k[len(GLM_PREFIX):]: v for k, v in state_dict.items()})

    # ------------------------------------------------------------------------------------------------------------
    # Official checkpoints
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an official ChatGLM2/3 directory (or one ``save_pretrained`` wrote), renaming at load time.

        Keyword arguments that are config fields (``pre_seq_len``, ``prefix_projection``, ...) override
        config.json; the rest (``dtype``, ``device_map``, ...) go to transformers' loader. A missing or unexpected
        tensor is an error naming it, except a new prefix encoder (``pre_seq_len`` on a base checkpoint).
        """
        return load_official(cls, pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained`` with the tensors under their official ChatGLM2 names."""
        save_official(self, save_directory, *args, **kwargs)
