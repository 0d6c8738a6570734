"""ChatGLM-6B (v1) configuration.

Field names are the ones of the released ``config.json`` so an official checkpoint directory loads as is; the
standard transformers names (``num_hidden_layers``, ``intermediate_size``, ...) are mapped onto them because the
generation utilities and PEFT look for those.
"""

from __future__ import annotations

import os

from transformers import PretrainedConfig

# The ids the model builds its masks and positions from (and generation stops on). They differ between releases, so
# a config.json must state them: the class defaults would silently give another vocabulary's ids.
REQUIRED_TOKEN_IDS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id")


class ChatGLMConfig(PretrainedConfig):
    """Configuration of ChatGLM-6B (v1); defaults are the released ``THUDM/chatglm-6b`` values.

    Every special-token id comes from here (the 150k-vocabulary first release shifts them all by 20000), so nothing
    in the model hard-codes a token id.
    """

    model_type = "chatglm"
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "layer_norm_eps": "layernorm_epsilon",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    # P-Tuning v2: number of virtual prefix tokens (None/0: no prefix encoder) and whether the prefix goes through
    # the two-layer MLP ("projection") or is a plain per-layer embedding.
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_dropout: float = 0.1
    # 0 (float weights), 4 or 8: the layout of THUDM/chatglm-6b-int4 stores packed weights and per-row scales.
    quantization_bit: int = 0
    quantization_embeddings: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.position_encoding_2d and head_dim % 4:
            raise ValueError(f"2D rotary positions need a head dimension divisible by 4, got {head_dim}")
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"quantization_bit must be 0, 4 or 8, got {self.quantization_bit}")
        if self.pre_seq_len is not None and self.pre_seq_len < 0:
            raise ValueError(f"pre_seq_len must be positive or None, got {self.pre_seq_len}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As transformers', plus: a config.json without one of ``REQUIRED_TOKEN_IDS``, or with one outside the
        vocabulary, fails here naming the file and the field (not at the first forward, with a mask error)."""
        config, rest = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, "config.json")
        where = path if os.path.isfile(path) else str(pretrained_model_name_or_path)
        if config.get("model_type", cls.model_type) != cls.model_type:
            return config, rest
        given = {**config, **rest}  # keyword overrides count as given
        absent = [name for name in REQUIRED_TOKEN_IDS if name not in given]
        if absent:
            raise ValueError(f"{where}: no {', '.join(absent)}: a ChatGLM config.json must give the special token "
                             "ids of its vocabulary (the released chatglm-6b's: 130004, 130005, 130000, 130001)")
        vocab = given.get("vocab_size", cls.vocab_size)
        outside = [f"{n}={given[n]}" for n in REQUIRED_TOKEN_IDS if isinstance(given[n], int) and given[n] >= vocab]
        if outside:
            raise ValueError(f"{where}: special token ids outside the vocabulary (vocab_size={vocab}): "
                             + ", ".join(outside))
        return config, rest

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads
