"""ChatGLM-6B (v1) for today's transformers.

Loads the official ``THUDM/chatglm-6b`` files unchanged (same state-dict names and shapes) and computes what the
original implementation computes; the facts it keeps are in ``shared/spec/chatglm6b.md``. Differences in *how*:

- batch-first layout ``[batch, seq, hidden]`` and ``[batch, heads, seq, head_dim]`` inside attention;
- masks and 2D positions are built once per forward with tensor ops (the original loops over the batch in Python
  and rebuilds them in every call), rotary cos/sin once per forward for all layers (the original recomputes the
  table in every layer);
- attention through ``scaled_dot_product_attention`` (``attn_implementation="sdpa"``, the default) or an eager path
  that follows the original formula step by step (``attn_implementation="eager"``);
- the KV cache is a transformers ``Cache``; the P-Tuning v2 prefix is concatenated inside attention and never
  enters the cache, so cache lengths count real tokens only;
- no parameter is frozen in here: fine-tuning methods freeze from outside (the one exception: INT8/INT4 layers,
  whose integers, scales and biases never require grad, as in the original; see ``quantization.py``).
"""

from __future__ import annotations

import copy
import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .configuration_chatglm import ChatGLMConfig
from .quantization import QuantizedLinear, freeze_quantized, quantize_model

# The original's masked score before its fp32 softmax; exp(-10000 * c - max) is exactly 0 in fp32, so a boolean
# mask (SDPA) gives the same probabilities for every row that has at least one visible key.
MASKED_SCORE = -10000.0
# The residual scale is sqrt(2 * 28) whatever num_layers says: the original's GLMBlock takes num_layers with a
# default of 28 and ChatGLMModel never passes it. Same value for the released 28-layer model; for smaller configs
# (our tiny model, the parity fixture) this constant is what the original computes.
RESIDUAL_ALPHA = math.sqrt(2 * 28)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Rotary helpers (pure functions)
# ----------------------------------------------------------------------------------------------------------------
def rotary_inv_freq(rot_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """1 / 10000^(2i/d), rounded through fp16 because the original stores the buffer as half."""
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim
    return (1.0 / (10000.0**exponent)).half().float()


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for every head dim, ``[b, 1, s, head_dim]``, from ``[b, n, s]`` positions (n = 1 or 2).

    With 2D positions the first half of each head rotates by ``position_ids`` and the second half by
    ``block_position_ids``. Angles are computed in fp32 whatever the activation dtype (the original rounds
    positions and angles to fp16 under ``.half()`` and breaks under bf16; in fp32 the two agree exactly).
    """
    n_kinds = position_ids.shape[1]
    inv_freq = rotary_inv_freq(head_dim // n_kinds, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # [b, n, s, rot/2]
    angles = torch.cat((angles, angles), dim=-1)  # [b, n, s, rot]: the original's cat(freqs, freqs)
    angles = angles.transpose(1, 2).flatten(2)[:, None]  # [b, 1, s, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_kinds: int) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, with rotate_half = cat(-x2, x1) applied inside each of the n_kinds blocks."""
    blocks = x.unflatten(-1, (n_kinds, 2, -1))  # [b, h, s, n, 2, rot/2]
    rotated = torch.stack((-blocks[..., 1, :], blocks[..., 0, :]), dim=-2).flatten(-3)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------------------
# Positions and masks (built from input_ids, as the original does, but vectorised over the batch)
# ----------------------------------------------------------------------------------------------------------------
def _first_index(hits: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row (rows without one give 0: callers check ``hits.any``)."""
    return hits.int().argmax(dim=1)


def _checked_on_host(ids: torch.Tensor) -> bool:
    """Whether to validate the special-token layout of ``ids`` on the host. Reading a flag back from an accelerator
    stalls it, so a training forward there (autograd recording) trusts its batch: glmft.data builds every training
    sequence with its [gMASK] and <sop>. CPU tensors and inference (generate's prefill, a user's forward) are
    always checked, so a hand-built prompt still fails with a sentence instead of a silently wrong mask."""
    return ids.device.type == "cpu" or not torch.is_grad_enabled()


def context_lengths(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """Per row, the index of the first <sop>: everything before it is the bidirectional context."""
    is_bos = input_ids == bos_token_id
    missing = ~is_bos.any(dim=1)
    if _checked_on_host(input_ids) and missing.any():
        raise ValueError(
            f"ChatGLM needs a <sop> token (id {bos_token_id}) in every sequence to place its context; rows "
            f"{missing.nonzero().flatten().tolist()} have none. Build prompts with the tokenizer's special tokens."
        )
    return _first_index(is_bos)


def build_position_ids(
    input_ids: torch.Tensor, config: ChatGLMConfig, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The original's positions, ``[b, 2, s]`` (2D) or ``[b, 1, s]``, for right- or left-padded batches.

    Context tokens count 0, 1, 2, ...; from <sop> on, the position stays at the mask token and (2D) the block
    position counts 1, 2, 3, .... Left pads shift the count so it starts at the first real token (as the original
    tokenizer's padded position ids do); pads themselves get 0.
    """
    batch, seq = input_ids.shape
    idx = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    ctx = context_lengths(input_ids, config.bos_token_id)[:, None]
    gmask = input_ids == config.gmask_token_id
    use_gmask = gmask.any(dim=1, keepdim=True)
    mask_hits = torch.where(use_gmask, gmask, input_ids == config.mask_token_id)
    if _checked_on_host(input_ids) and not mask_hits.any(dim=1).all():
        raise ValueError("ChatGLM needs a [gMASK] or [MASK] token in every sequence (its position anchors the answer)")
    mask_pos = _first_index(mask_hits)[:, None]
    start = _first_index(padding_mask.bool())[:, None] if padding_mask is not None else torch.zeros_like(ctx)
    after_ctx = idx >= ctx
    if config.position_encoding_2d:
        position = torch.where(after_ctx, mask_pos, idx) - start
        block = (idx - ctx + 1).clamp(min=0)
        return torch.stack((position.clamp(min=0), block), dim=1)
    # 1D: positions keep counting for [gMASK]; with [MASK] the answer sits at the mask position.
    position = torch.where(after_ctx & ~use_gmask, mask_pos, idx) - start
    return position.clamp(min=0)[:, None]


def build_attention_mask(
    input_ids: torch.Tensor, config: ChatGLMConfig, past_length: int, padding_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Boolean ``[b, 1, q, kv]`` mask, True = may attend; None when every query sees every key.

    Causal, except that the first ``context_length`` positions are visible to all (bidirectional context) and
    pads are never visible. A new token generated with a cache lies after the context, so it sees all non-pad keys.
    """
    batch, q_len = input_ids.shape
    kv_len = past_length + q_len
    device = input_ids.device
    keys = torch.arange(kv_len, device=device)
    if past_length == 0:
        queries = torch.arange(q_len, device=device)
        ctx = context_lengths(input_ids, config.bos_token_id)
        allowed = (keys[None, None, :] <= queries[None, :, None]) | (keys[None, None, :] < ctx[:, None, None])
    elif q_len == 1 and padding_mask is None:
        return None
    else:
        queries = torch.arange(past_length, kv_len, device=device)
        allowed = (keys[None, :] <= queries[:, None]).expand(batch, q_len, kv_len)
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, -kv_len:]
        # A pad query would see nothing (NaN under SDPA); let it see itself. Its output is never read.
        allowed = allowed | (keys[None, None, :] == queries[None, :, None])
    return allowed[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------
def layer_linear(config: ChatGLMConfig, in_features: int, out_features: int) -> nn.Module:
    """One of a layer's four matrices: ``nn.Linear``, or its frozen INT8/INT4 form when ``quantization_bit`` is set."""
    if config.quantization_bit:
        return QuantizedLinear(in_features, out_features, config.quantization_bit)
    return nn.Linear(in_features, out_features)


def torch_default_init(module: nn.Module) -> None:
    """PyTorch's own initialisation (embedding N(0, 1), Linear Kaiming-uniform), where the original leaves the prefix
    encoder: P-Tuning's usual learning rate (1e-2) is tuned for that scale. transformers' guarded init functions
    skip tensors that were loaded from a checkpoint. Shared with ChatGLM2/3's prefix encoder."""
    if isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=1.0)
    elif isinstance(module, nn.Linear):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(module.in_features)
        init.uniform_(module.bias, -bound, bound)


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: per-layer past keys/values for ``pre_seq_len`` virtual tokens (original key names)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        kv_size = config.num_layers * 2 * config.hidden_size
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        for layer in self.modules():
            layer._torch_default_init = True  # see ChatGLMPreTrainedModel._init_weights

    def forward(self, prefix_ids: torch.Tensor) -> torch.Tensor:
        prefix = self.embedding(prefix_ids)
        return self.trans(prefix) if hasattr(self, "trans") else prefix  # [b, P, 2 * L * h]


class ChatGLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.n_kinds = 2 if config.position_encoding_2d else 1
        self.query_key_value = layer_linear(config, config.hidden_size, 3 * config.hidden_size)
        self.dense = layer_linear(config, config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, mask, prefix_key, prefix_value, cache: Cache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.query_key_value(x).view(batch, seq, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # [b, heads, s, d] each
        q = apply_rotary(q, cos, sin, self.n_kinds)
        k = apply_rotary(k, cos, sin, self.n_kinds)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if prefix_key is not None:  # prefix keys are used as stored: no rotary (as in the original)
            k = torch.cat((prefix_key, k), dim=2)
            v = torch.cat((prefix_value, v), dim=2)
            if mask is not None:  # every query sees the whole prefix
                prefix_cols = mask.new_ones(*mask.shape[:-1], prefix_key.shape[2])
                mask = torch.cat((prefix_cols, mask), dim=-1)
        if self.config._attn_implementation == "eager":
            context = self._eager(q, k, v, mask)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(context.transpose(1, 2).reshape(batch, seq, -1))  # [b, s, h]

    def _eager(self, q, k, v, mask):
        """The original formula: scores of q / (sqrt(d) * c), masked to -10000, times c, softmax in fp32."""
        coeff = float(self.layer_idx + 1)
        scores = torch.matmul(q / (math.sqrt(self.head_dim) * coeff), k.transpose(-1, -2))  # [b, heads, q, kv]
        if mask is not None:
            scores = scores.masked_fill(~mask, MASKED_SCORE)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
        return torch.matmul(probs, v)


class ChatGLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = layer_linear(config, config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = layer_linear(config, config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original's gelu is the tanh approximation.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class ChatGLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLMMLP(config)
        self.alpha = RESIDUAL_ALPHA

    def forward(self, x, cos, sin, mask, prefix_key=None, prefix_value=None, cache: Cache | None = None):
        # Tensors that may need gradients (x, the prefix) are positional so that re-entrant checkpointing sees them.
        # The residual adds the *normalised* input scaled by alpha (GLM's DeepNorm-style residual).
        a = self.input_layernorm(x)
        x = a * self.alpha + self.attention(a, cos, sin, mask, prefix_key, prefix_value, cache=cache)
        m = self.post_attention_layernorm(x)
        return m * self.alpha + self.mlp(m)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLMBlock"]
    _supports_sdpa = True
    # Older official files store the rotary buffer; we recompute it, so it is not a weight.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, QuantizedLinear):
            return  # integers and scales come from a checkpoint or quantize_model; never normal_-init int8
        if not getattr(module, "_torch_default_init", False):
            super()._init_weights(module)
        else:
            torch_default_init(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' ``from_pretrained``, but a missing, unexpected or wrongly shaped tensor is an error naming
        it, not a warning (a P-Tuning checkpoint loaded without ``pre_seq_len`` would otherwise lose its prefix).

        The one tensor allowed to be absent is a new P-Tuning prefix encoder (``pre_seq_len`` set as an override
        on a base checkpoint): it starts from its initialisation, as in the original.

        ``quantization_bit=4`` or ``8`` (an override, or in ``config``) on a float checkpoint quantizes while
        loading: the float model is loaded and checked as usual, then its matrices are quantized one at a time,
        each float weight freed as soon as it is replaced (peak: the float model plus one quantized matrix). We do
        not hook transformers' loader to quantize tensor by tensor: its quantizer API is internal and has changed
        between major versions, and loading in full first keeps the strict key check above unchanged.
        A checkpoint that is already quantized (``quantization_bit`` in its config.json) loads its integers as is.
        """
        want_info = kwargs.pop("output_loading_info", False)
        tolerate_shapes = kwargs.pop("ignore_mismatched_sizes", False)
        quantize_to = cls._quantize_on_load(args[0] if args else kwargs.get("pretrained_model_name_or_path"), kwargs)
        # transformers only logs which tensor is mis-shaped before raising; load tolerantly and name it ourselves.
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if ".prefix_encoder." not in f".{k}")
        mismatched = [] if tolerate_shapes else list(info.get("mismatched_keys", ()))
        unexpected = sorted(info.get("unexpected_keys", ()))  # transformers has already dropped the ignored ones
        if missing or mismatched or unexpected:
            details = [f"missing tensor {name}" for name in missing]
            details += [f"tensor {m[0]} has shape {tuple(m[1])}, the model expects {tuple(m[2])}" for m in mismatched]
            details += [f"unexpected tensor {name}" for name in unexpected] + _unexpected_hint(unexpected, model.config)
            raise ValueError(f"checkpoint {args[0] if args else ''} does not match the config: " + "; ".join(details))
        if quantize_to:
            quantize_model(model, quantize_to)
        freeze_quantized(model)
        return (model, info) if want_info else model

    @classmethod
    def _quantize_on_load(cls, path, kwargs: dict) -> int:
        """The bits to quantize a float checkpoint to after loading it (0: load as stored); edits ``kwargs`` so
        that the float model is the one built."""
        config = kwargs.get("config")
        wanted = kwargs.pop("quantization_bit", getattr(config, "quantization_bit", None))
        if wanted is None:
            return 0
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "subfolder", "token", "local_files_only") if k in kwargs}
        stored = cls.config_class.from_pretrained(path, **hub).quantization_bit
        if stored == wanted:
            if config is None:
                kwargs["quantization_bit"] = wanted
            return 0
        if stored:
            raise ValueError(f"{path} stores INT{stored} weights: it cannot be loaded with quantization_bit={wanted}")
        if config is not None:
            kwargs["config"] = copy.deepcopy(config)
            kwargs["config"].quantization_bit = 0
        return wanted


def _unexpected_hint(unexpected: list[str], config: ChatGLMConfig) -> list[str]:
    """What to pass when a checkpoint's extra tensors are a P-Tuning v2 prefix the config does not build."""
    prefix = [k for k in unexpected if ".prefix_encoder." in f".{k}"]
    if prefix and not config.pre_seq_len:
        projection = " and prefix_projection=True" if any(".trans." in k for k in prefix) else ""
        return [f"it holds a P-Tuning v2 prefix encoder: pass pre_seq_len (its prefix length){projection} when "
                "loading (without it the model would run without the prefix)"]
    if any(".prefix_encoder.trans." in k for k in prefix) and not config.prefix_projection:
        return ["its prefix encoder has a projection MLP: pass prefix_projection=True"]
    return []


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embeddings, the GLM blocks and the final layernorm (``transformer.*`` in the official state dict)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        if config.quantization_bit and config.quantization_embeddings:
            raise ValueError("quantized embeddings (quantization_embeddings=true) are not supported")
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ChatGLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(config.prefix_dropout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def prefix_key_values(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """P-Tuning v2 past keys/values, ``[2 * layers, b, heads, P, d]``: layer i uses rows 2i (key), 2i+1 (value)."""
        cfg = self.config
        ids = torch.arange(cfg.pre_seq_len, device=self.prefix_encoder.embedding.weight.device).expand(batch, -1)
        kv = self.prefix_encoder(ids).to(dtype)
        kv = kv.view(batch, cfg.pre_seq_len, 2 * cfg.num_layers, cfg.num_attention_heads, cfg.head_dim)
        return self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``input_ids`` are required (masks and positions come from its <sop>/[gMASK]); ``attention_mask`` is
        the usual 2D padding mask (1 real, 0 pad) covering cached + new tokens; ``position_ids`` ``[b, 2, s]``
        are built from ``input_ids`` when absent (needed explicitly only when continuing from a cache)."""
        cache = kwargs.pop("past_key_values", cache)
        if input_ids is None:
            raise ValueError("ChatGLM builds its masks and 2D positions from input_ids: pass input_ids")
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and not (self.training and torch.is_grad_enabled()) and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        # An all-ones mask changes neither positions nor a full mask, so a full forward (training, prefill) takes it
        # as it is: testing it would stall the device every micro-batch. Only a cached one-token step, which can then
        # skip its mask entirely, looks.
        padding_mask = attention_mask
        if attention_mask is not None and past and bool(attention_mask.all()):
            padding_mask = None
        if position_ids is None:
            if past:
                raise ValueError("position_ids are needed when continuing from a cache (generate() passes them)")
            position_ids = build_position_ids(input_ids, self.config, padding_mask)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, x.dtype)
        mask = build_attention_mask(input_ids, self.config, past, padding_mask)
        prefix = self.prefix_key_values(x.shape[0], x.dtype) if self.prefix_encoder is not None else None
        all_hidden = () if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden += (x,)
            pk, pv = (prefix[2 * i], prefix[2 * i + 1]) if prefix is not None else (None, None)
            x = layer(x, cos, sin, mask, pk, pv, cache=cache)
        x = self.final_layernorm(x)
        if all_hidden is not None:
            all_hidden += (x,)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache, hidden_states=all_hidden)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM with its (tied) output layer, loss and generation glue."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward. ``logits_to_keep=N`` returns logits of the last N positions only (0: all); the loss
        never depends on it: it is computed from the labelled positions alone, in fp32, as the original does."""
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=kwargs.pop("past_key_values", cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(hidden.device)
            picked = targets != -100
            # Only labelled positions go through the fp32 cross-entropy: a [b, s, vocab] fp32 copy of the logits
            # is what ran the original out of memory on long prompts.
            scores = logits[:, :-1][picked] if not logits_to_keep else self.lm_head(hidden[:, :-1][picked])
            loss = F.cross_entropy(scores.float(), targets[picked])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask=None, **kwargs):
        # The new token's 2D position (mask position, next block position) comes from the whole sequence so far;
        # building it with tensor ops over the full ids also keeps beam reordering trivially correct.
        padding_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        kwargs["position_ids"] = build_position_ids(input_ids, self.config, padding_mask)
        return super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # chat(): the original's prompt format and defaults, for a quick manual check
    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        **generate_kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        history = list(history or [])
        inputs = chat_inputs(tokenizer, query, history, max_length).to(self.device)
        processors = LogitsProcessorList([SafeScoresProcessor(tokenizer)])
        if do_sample:
            generate_kwargs.update(top_p=top_p, temperature=temperature)
        output = self.generate(
            **inputs, max_length=max_length, do_sample=do_sample, logits_processor=processors, **generate_kwargs
        )
        steps = processors[0].nonfinite_steps
        if steps is not None and bool(steps.any()):
            logger.warning("chat: the model gave NaN/inf scores at %d step(s); those tokens are fallback blanks",
                           int(steps.sum()))
        reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        reply = full_width_punctuation(reply)
        return reply, history + [(query, reply)]


def chat_inputs(tokenizer, query: str, history: list[tuple[str, str]], max_length: int):
    """The prompt's tensors, leaving room to answer: while the prompt takes more than three quarters of
    ``max_length``, the oldest turn is left out of it (generate() refuses a prompt of ``max_length`` tokens, and a
    long first reply would otherwise end the chat on the next turn). The caller's history itself is kept whole."""
    kept = list(history)
    while True:
        inputs = tokenizer([chat_prompt(query, kept)], return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        if not kept or length <= max_length - max(1, max_length // 4):
            break
        kept = kept[1:]
    if length >= max_length:
        raise ValueError(f"chat: the query alone is {length} tokens, max_length={max_length} leaves no room for a "
                         "reply: raise max_length")
    if len(kept) < len(history):
        logger.warning("chat: the %d oldest turn(s) left out of the prompt to fit max_length=%d",
                       len(history) - len(kept), max_length)
    return inputs


def chat_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """The original chat layout: "[Round i]\\n问：q\\n答：a\\n" per past turn, the query alone without history."""
    if not history:
        return query
    turns = [f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history)]
    return "".join(turns) + f"[Round {len(history)}]\n问：{query}\n答："


_CJK = "\u4e00-\u9fff"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def full_width_punctuation(text: str) -> str:
    """The original's reply clean-up: ASCII , ! : ; ? touching a Chinese character becomes full width."""
    text = text.strip()
    for ascii_mark, wide in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(f"([{_CJK}]){mark}", lambda m, w=wide: m.group(1) + w, text)
        text = re.sub(f"{mark}([{_CJK}])", lambda m, w=wide: w + m.group(1), text)
    return text


class SafeScoresProcessor(LogitsProcessor):
    """Never sample an id that has no tokenizer piece; a row with NaN/inf scores falls back to the blank piece
    (the original forces id 5, "▁", the same way) so generation goes on, and is counted, not hidden.

    ``nonfinite_steps`` holds, per row of the current batch (``batch * num_beams`` rows), how many generation
    steps had a non-finite score since the last ``reset()``; it stays on the device (no host sync per token).
    """

    def __init__(self, tokenizer):
        # Every id the tokenizer can write: its vocabulary and any tokens added to it (other model families).
        self.n_pieces = max(tokenizer.vocab_size, len(tokenizer))
        blank = tokenizer.convert_tokens_to_ids("▁")
        # A tokenizer without a blank piece (byte-level BPE) ends the answer there instead.
        self.fallback_id = blank if blank is not None and blank != tokenizer.unk_token_id else tokenizer.eos_token_id
        self.reset()

    def reset(self) -> None:
        self.nonfinite_steps: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad_rows = ~torch.isfinite(scores).all(dim=-1)
        counted = self.nonfinite_steps
        if counted is None or counted.shape != bad_rows.shape:  # a new batch without reset(): start over
            counted = torch.zeros(bad_rows.shape, dtype=torch.long, device=scores.device)
        self.nonfinite_steps = counted + bad_rows
        scores = scores.masked_fill(bad_rows[:, None], 0.0)
        scores[:, self.fallback_id] = torch.where(bad_rows, 5e4, scores[:, self.fallback_id])
        if scores.shape[-1] > self.n_pieces:
            scores[:, self.n_pieces :] = float("-inf")
        return scores
