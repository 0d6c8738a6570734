"""Tiny stand-ins for the released ChatGLM-6B files, small enough to ship and fast enough for CPU tests.

``--model_dir tiny`` anywhere in the project means this directory: a 2-layer ChatGLM with random weights and a
1348-piece tokenizer built from ``data/`` (see README.md here for how both are built).
"""

from __future__ import annotations

from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent


def resolve_model_dir(model_dir: str | Path) -> Path:
    """``"tiny"`` names the bundled tiny model; anything else is a local directory, checked to exist."""
    if str(model_dir) == "tiny":
        return TINY_DIR
    if str(model_dir) == "mini":  # the CPU-pretrained small model (chatglm/mini/README.md)
        return TINY_DIR.parent / "mini"
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model_dir {model_dir}: no config.json there (a local model directory, 'tiny' or 'mini')")
    return path


def tiny(dtype=None):
    """The bundled tiny model (eval mode) and its tokenizer: ``model, tokenizer = chatglm.tiny()``."""
    import torch

    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
    from chatglm.tokenization_chatglm import ChatGLMTokenizer

    model = ChatGLMForConditionalGeneration.from_pretrained(TINY_DIR, dtype=dtype or torch.float32).eval()
    return model, ChatGLMTokenizer.from_pretrained(TINY_DIR)
