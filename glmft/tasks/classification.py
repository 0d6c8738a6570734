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

The label set (``read_labels``): ``--labels`` (a file holding a JSON list or one label per line, or a comma-separated
list), else ``labels.json`` beside the data file, else (training) the distinct labels of the training file, sorted;
training records it in meta.json, where prediction finds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from matplotlib import font_manager
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, f1_score

from glmft.tasks.base import INSTRUCTION, Layout

NAME = "classification"
DEFAULT_PROMPT = "请判断下面文本的类别，只回答类别名称。文本："
LAYOUTS = (Layout(("text",), "label"), Layout(("text",), "answer"), INSTRUCTION)
USES_LABELS = True
MULTI_REFERENCE = False
HEADLINE = "accuracy"
COLUMNS = (("accuracy", "accuracy", "f1"), ("macro_f1", "macro-F1", "f1"),
           ("invalid_rate", "invalid", "share"))
INVALID = "invalid"
LABELS_FILE = "labels.json"  # looked for beside the data file when --labels is not given

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
    per_record = [record_scores(gold, pred, known) for gold, pred in zip(golds, preds, strict=True)]
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


def record_scores(gold: str, pred: str, labels: Sequence[str] | set[str]) -> dict[str, bool]:
    """One record: ``correct`` (exactly the gold label) and ``valid`` (one of the labels)."""
    return {"correct": gold == pred, "valid": pred in labels}


def format_summary(metrics: dict) -> str:
    """What predict prints: the scores, then the confusion matrix (rows gold, columns predicted)."""
    m = metrics
    lines = [f"records {m['n']}, {len(m['labels'])} labels: accuracy {m['accuracy']:.4f}, macro-F1 "
             f"{m['macro_f1']:.4f}, invalid (outside the label set, counted wrong) {m['invalid_rate']:.1%}",
             "confusion (rows gold, columns predicted; last column invalid):"]
    width = max(len(label) for label in m["confusion_columns"])
    for label, row in zip(m["labels"], m["confusion"], strict=True):
        lines.append(f"  {label:<{width}} " + " ".join(f"{count:>4}" for count in row))
    return "\n".join(lines)


def write_figures(metrics: dict, out_dir: Path) -> list[Path]:
    """The confusion matrix as ``confusion.png``."""
    return [plot_confusion(metrics["confusion"], metrics["labels"], Path(out_dir) / "confusion.png")]


def read_labels(spec: str, data_path: str | Path) -> tuple[list[str], str] | None:
    """The label set and where it came from: ``spec`` (a file: JSON list or one label per line; else a comma list),
    else ``labels.json`` beside ``data_path``; None when neither gives one."""
    if spec:
        path = Path(spec)
        if not path.is_file() and (path.suffix in (".json", ".txt", ".jsonl") or "/" in spec):
            raise FileNotFoundError(f"--labels {spec}: no such file (give a file, or labels separated by commas)")
        if not path.is_file():
            return _checked([s.strip() for s in spec.split(",") if s.strip()], "--labels"), "--labels"
        return _checked(_labels_file(path), str(path)), str(path)
    beside = Path(data_path).parent / LABELS_FILE
    return (_checked(_labels_file(beside), str(beside)), str(beside)) if beside.is_file() else None


def _labels_file(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not a valid JSON list of labels ({err.msg})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _checked(labels: list, where: str) -> list[str]:
    bad = [x for x in labels if not isinstance(x, str) or not x.strip()]
    if not labels or bad or len(set(labels)) != len(labels):
        raise ValueError(f"{where}: the label set must be non-empty strings without repeats, got {labels!r}")
    return labels


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
