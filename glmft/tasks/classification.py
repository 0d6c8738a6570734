"""Scores for classification by generation: the model writes a label string, scored against a fixed label set.

* A prediction is compared to the label strings exactly (the caller strips decoded text). One that is not in the
  set is *invalid*: it counts as wrong and is never dropped, so ``accuracy`` is over all records and
  ``invalid_rate`` says how many of the errors are outputs the task does not even allow.
* ``accuracy`` is scikit-learn's ``accuracy_score``; ``macro_f1`` is ``f1_score(average="macro", labels=labels,
  zero_division=0)``: the unweighted mean over the label set only, so an invalid prediction lowers the recall of
  its gold class and is a false positive for no class; a label that is neither gold nor predicted scores F1 0.
* ``confusion``: rows are gold labels in ``labels`` order, columns the same labels plus a last ``"invalid"``
  column; ``plot_confusion`` draws it to a PNG.
* A gold label outside the set is an error in the data, not in the model, and fails naming the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib import font_manager
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, f1_score

NAME = "classification"
HEADLINE = "accuracy"
INVALID = "invalid"

# Fonts with CJK glyphs, tried in order when a label is not ASCII (matplotlib's default font has none).
_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
              "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN")


def _check(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> None:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    if not golds:
        raise ValueError("no records to score")
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"the label set must be non-empty and without repeats, got {list(labels)!r}")
    known = set(labels)
    for i, gold in enumerate(golds):
        if gold not in known:
            raise ValueError(f"record {i}: gold label {gold!r} is not in the label set {list(labels)!r}")


def confusion(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Counts [gold][predicted]; the last column counts predictions outside ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for gold, pred in zip(golds, preds, strict=True):
        matrix[index[gold]][index.get(pred, len(labels))] += 1
    return matrix


def score(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict:
    """``accuracy``, ``macro_f1``, ``invalid_rate``, ``n``, ``labels``, ``confusion`` (with its ``confusion_columns``)
    and ``per_record`` (one dict per record: ``correct`` and ``valid``)."""
    labels = list(labels)
    _check(golds, preds, labels)
    known = set(labels)
    valid = [pred in known for pred in preds]
    per_record = [{"correct": gold == pred, "valid": ok} for gold, pred, ok in zip(golds, preds, valid, strict=True)]
    return {
        "accuracy": float(accuracy_score(golds, preds)),
        "macro_f1": float(f1_score(golds, preds, labels=labels, average="macro", zero_division=0)),
        "invalid_rate": valid.count(False) / len(preds),
        "n": len(golds),
        "labels": labels,
        "confusion_columns": [*labels, INVALID],
        "confusion": confusion(golds, preds, labels),
        "per_record": per_record,
    }


def _cjk_font() -> str | None:
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    return next((name for name in _CJK_FONTS if name in installed), None)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Draw ``matrix`` (rows: gold ``labels``; columns: ``labels`` + invalid) as a PNG at ``path``.

    Non-ASCII labels need a CJK font; without one installed, ticks show label indices (their order in ``labels``,
    as written in metrics.json) rather than empty boxes."""
    labels = list(labels)
    font = _cjk_font() if not all(label.isascii() for label in labels) else None
    names = labels if font or all(label.isascii() for label in labels) else [str(i) for i in range(len(labels))]
    fig = Figure(figsize=(1.2 + 0.45 * (len(labels) + 1), 1.0 + 0.45 * len(labels)))  # no pyplot: no global state
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    top = max(max(counts) for counts in matrix)
    for row, counts in enumerate(matrix):
        for col, count in enumerate(counts):
            if count:  # white on the dark cells so the count stays readable
                ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > top / 2 else "black")
    ax.set_xticks(range(len(names) + 1), [*names, INVALID], rotation=60, ha="right", fontsize=8, family=font)
    ax.set_yticks(range(len(names)), names, fontsize=8, family=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title if names is labels else f"{title} (ticks: label index)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
