"""Files the project ships beside its packages (data samples, DeepSpeed configs), found from any directory.

A default such as ``data/sample_train.jsonl`` or ``ds_config.json`` names a file of the checkout. When a script runs
from another directory, that relative path is looked up in the project root (the directory holding ``glmft/``,
which an editable install points at) and, for a regular install, in ``<prefix>/share/chatglm-finetuning``.
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARE_DIR = Path(sys.prefix) / "share" / "chatglm-finetuning"
# Relative paths of what ships (pyproject.toml installs the same set as data files).
SHIPPED = ("ds_config.json", "ds_zero*.json", "data/*")


def is_shipped(path: str | Path) -> bool:
    """Whether a relative path names one of the files the project ships."""
    return any(fnmatch.fnmatch(Path(path).as_posix(), pattern) for pattern in SHIPPED)


def resolve(path: str) -> str:
    """``path`` itself when it exists (or is absolute, or is not one of the shipped names); otherwise the shipped
    copy's absolute path, if there is one. Unknown files come back unchanged, so the error still names them."""
    if not path or Path(path).is_absolute() or Path(path).exists() or not is_shipped(path):
        return path
    for root in (PROJECT_ROOT, SHARE_DIR):
        if (root / path).is_file():
            return str(root / path)
    return path
