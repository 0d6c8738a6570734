"""A small ChatGLM-6B (v1) pretrained here on the CPU, so that fine-tuning methods can be seen to learn.

``--model_dir mini`` anywhere in the project means this directory. ``python -m chatglm.mini.build`` rebuilds its
tokenizer and weights from the training splits in ``../shared/data``; README.md here is the model card.
"""

from __future__ import annotations

from pathlib import Path

MINI_DIR = Path(__file__).resolve().parent
