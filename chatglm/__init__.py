"""ChatGLM-6B (v1) on today's transformers: configuration, model and tokenizer, registered with the Auto classes
locally (no ``trust_remote_code``, no network)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_chatglm import ChatGLMConfig
from .modeling_chatglm import ChatGLMForConditionalGeneration, ChatGLMModel
from .tiny import TINY_DIR, resolve_model_dir, tiny
from .tokenization_chatglm import ChatGLMTokenizer
from .tokenization_chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer

AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
AutoModel.register(ChatGLMConfig, ChatGLMModel, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)

# ChatGLM2/3 share model_type "chatglm": this routes the type by config fields, so it must follow v1's registration.
from .chatglm2 import ChatGLM2Config, ChatGLM2ForCausalLM, register  # noqa: E402

register()
# ChatGLM2/3 directories: ChatGLMTokenizer.from_pretrained hands them to ChatGLM2Tokenizer or ChatGLM3Tokenizer.
AutoTokenizer.register(ChatGLM2Config, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)

__all__ = [
    "ChatGLMConfig", "ChatGLMModel", "ChatGLMForConditionalGeneration", "ChatGLMTokenizer",
    "ChatGLM2Config", "ChatGLM2ForCausalLM",
    "ChatGLM2Tokenizer", "ChatGLM3Tokenizer",
    "TINY_DIR", "resolve_model_dir", "tiny",
]
