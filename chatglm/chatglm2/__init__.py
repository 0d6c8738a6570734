"""ChatGLM2-6B and ChatGLM3-6B (one network; they differ in tokenizer and prompt format) on transformers' native
``GlmForCausalLM``, loaded from the official checkpoint layout without ``trust_remote_code``.

Registration: v1 (ChatGLM-6B) and v2/v3 checkpoints all say ``model_type: chatglm``. transformers maps a model_type
to one config class, so ``register()`` maps "chatglm" to ``ChatGLM2Config``, whose ``from_dict`` hands a config
dict without the v2 fields (``multi_query_attention``, ``kv_channels``, ``ffn_hidden_size``,
``padded_vocab_size``) to v1's ``ChatGLMConfig``. The model classes are then chosen by the config's class, as usual.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import ChatGLM2Config, is_chatglm2_config
from .convert import glm_to_official, official_to_glm
from .modeling import ChatGLM2ForCausalLM, PrefixCache, PrefixEncoder


def register() -> None:
    """Route ``model_type: chatglm`` by config fields (call after v1's own registration, which it replaces)."""
    AutoConfig.register("chatglm", ChatGLM2Config, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLM2Config, ChatGLM2ForCausalLM, exist_ok=True)
    # THUDM's README loads with AutoModel, and its auto_map maps AutoModel to the generation class too.
    AutoModel.register(ChatGLM2Config, ChatGLM2ForCausalLM, exist_ok=True)


__all__ = ["ChatGLM2Config", "ChatGLM2ForCausalLM", "PrefixCache", "PrefixEncoder", "glm_to_official",
           "is_chatglm2_config", "official_to_glm", "register"]
