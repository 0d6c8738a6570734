"""A tiny stand-in for ChatGLM2/3's ``tokenizer.model`` (1000 pieces, the real id layout): see build_tokenizer.py."""

from pathlib import Path

TINY2_DIR = Path(__file__).resolve().parent
