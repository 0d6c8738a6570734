"""ChatGLM2-6B / ChatGLM3-6B configuration, read from the official ``config.json`` as it is.

The stored field names are THUDM's (``num_layers``, ``kv_channels``, ``multi_query_group_num``, ...) so a checkpoint
directory loads unchanged and ``save_pretrained`` writes a file the original code reads too. transformers'
``GlmModel`` reads the standard names (``num_hidden_layers``, ``head_dim``, ``num_key_value_heads``, ...): they are
mapped onto the official ones, and ``rope_parameters`` is derived (see ``__post_init__``).
"""

from __future__ import annotations

from transformers import PretrainedConfig

# The fields only a ChatGLM2/3 config.json has (v1's has ``inner_hidden_size`` and ``position_encoding_2d``): both
# share model_type "chatglm", so ``is_chatglm2_config`` tells them apart by these.
V2_FIELDS = ("multi_query_attention", "kv_channels", "ffn_hidden_size", "padded_vocab_size")

# Switches of the original network that GlmModel computes only in one setting: (field, the value GlmModel computes).
FIXED_FIELDS = (
    ("rmsnorm", True),  # LayerNorm instead of RMSNorm: not GlmModel's norm
    ("add_bias_linear", False),  # biases on dense / MLP matrices: GlmModel has none there
    ("apply_residual_connection_post_layernorm", False),  # residual from the normed input
    ("post_layer_norm", True),  # GlmModel always applies the final norm
)


def is_chatglm2_config(config_dict: dict) -> bool:
    """Whether a ``model_type: chatglm`` config dict describes ChatGLM2/3 (else it is ChatGLM-6B v1)."""
    return any(name in config_dict for name in V2_FIELDS)


class ChatGLM2Config(PretrainedConfig):
    """Configuration of ChatGLM2-6B and ChatGLM3-6B; defaults are the released ``THUDM/chatglm2-6b`` values."""

    model_type = "chatglm"
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "ffn_hidden_size",
        "head_dim": "kv_channels",
        "num_key_value_heads": "multi_query_group_num",
        "vocab_size": "padded_vocab_size",
        "rms_norm_eps": "layernorm_epsilon",
        "max_position_embeddings": "seq_length",
        "attention_bias": "add_qkv_bias",
    }

    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    layernorm_epsilon: float = 1e-5
    seq_length: int = 32768
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    rmsnorm: bool = True
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    original_rope: bool = True
    # ChatGLM3-6B-32k / GLM-4 scale the rotary base: theta = 10000 * rope_ratio (1 for chatglm2-6b / chatglm3-6b).
    rope_ratio: float = 1.0
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    rope_parameters: dict | None = None
    # P-Tuning v2: number of virtual prefix tokens (None/0: no prefix encoder), the two-layer MLP ("projection") or
    # a plain per-layer embedding, and the dropout the original applies to the prefix in train mode.
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_dropout: float = 0.1
    # 0 (float weights), 4 or 8: the layout of THUDM/chatglm2-6b-int4 (packed integers plus per-row fp16 scales).
    quantization_bit: int = 0

    def __post_init__(self, **kwargs):
        # Keys of the official file that describe only kernels or fp16 tricks of the original (layer scaling,
        # fp32 softmax, fused bias-dropout): they do not change the fp32 function, and are kept for saving.
        super().__post_init__(**kwargs)
        for field, computed in FIXED_FIELDS:
            if getattr(self, field, computed) != computed:
                raise ValueError(f"config.json: {field}={getattr(self, field)} is not supported (only {computed}: "
                                 "the network is transformers' GlmModel, which has no other setting)")
        if not self.multi_query_attention:  # every head has its own keys and values (MHA)
            self.multi_query_group_num = self.num_attention_heads
        if self.num_attention_heads % self.multi_query_group_num:
            raise ValueError(f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"multi_query_group_num ({self.multi_query_group_num})")
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"config.json: quantization_bit must be 0, 4 or 8, got {self.quantization_bit}")
        if self.pre_seq_len is not None and self.pre_seq_len < 0:
            raise ValueError(f"pre_seq_len must be positive or None, got {self.pre_seq_len}")
        # The original rotates the first half of every head (RotaryEmbedding(kv_channels // 2)), pairs interleaved:
        # GlmModel's rotary with partial_rotary_factor 0.5 is that function.
        self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0 * self.rope_ratio,
                                "partial_rotary_factor": 0.5}

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers', except that a ChatGLM-6B (v1) dict, which shares ``model_type: chatglm``, becomes v1's
        ``ChatGLMConfig``: AutoConfig maps "chatglm" to this class (see ``chatglm/chatglm2/__init__.py``)."""
        if not is_chatglm2_config(config_dict):
            from ..configuration_chatglm import ChatGLMConfig  # v1 imports nothing of ours: no cycle

            return ChatGLMConfig.from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)
