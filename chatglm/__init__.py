"""ChatGLM-6B (v1) on today's transformers: configuration, model and tokenizer, registered with the Auto classes
locally (no ``trust_remote_code``, no network)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_chatglm import ChatGLMConfig
from .modeling_chatglm import ChatGLMForConditionalGeneration, ChatGLMModel

AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
AutoModel.register(ChatGLMConfig, ChatGLMModel, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)

__all__ = ["ChatGLMConfig", "ChatGLMModel", "ChatGLMForConditionalGeneration"]
