"""Triple extraction (the seeds' task): answers hold one ``subject_relation_object`` triple per line.

Parsing (the same for gold and generated answers, see ``parse_triples``):

* Each line is stripped; empty lines are skipped and are not failures. An empty or all-whitespace answer means
  "no triples".
* A well-formed line splits on ``_`` into exactly 3 parts that are non-empty after stripping; whitespace around
  parts is dropped, whitespace inside a part is kept. Matching is exact on the stripped (s, r, o) tuple.
* Any other non-empty line (``a_b``, ``a_b_c_d``, ``_b_c``) is malformed. It is never scored as a triple; in a
  prediction it counts in ``parse_failures``, in a gold answer it is kept out of the gold set and counted in
  ``gold_malformed`` (the seed data has none). We do not guess where a 4-part line's boundaries are: splitting on
  the first or last ``_`` would credit or penalise an arbitrary reading, so we count the line as a format error.
  The v0.1 seed scorer instead kept only lines whose unstripped ``split("_")`` has 3 parts, so it silently
  dropped ``a_b_c_d`` (neither scored nor counted), kept ``_b_c`` with an empty subject, and compared gold lines
  unfiltered and unstripped.
* Duplicates within a record count once; order does not matter. Relations outside the known set are still
  scored as triples (they cannot match gold) and appear in ``per_relation``; a known relation with neither gold
  nor predicted triples has None scores there (not measurable), support 0.

Conventions for empty sets, per record and for micro totals: gold and prediction both empty scores P = R = F1 =
1 (nothing to find, nothing claimed). Otherwise an empty denominator gives 0: empty prediction has P = 0, empty
gold has R = 0, and F1 = 2 tp / (n_pred + n_gold) is 0. The seeds split an empty gold answer into ``{""}``, a
one-element set no prediction can match, so such a record always scored 0 there; the seed test split
(``spo_1.json``) has no empty gold answer, so both conventions give the same number on it.

``sample_f1`` is the seed metric (mean per-record F1) but divided by the real record count; the seeds divided
by a hard-coded 50. ``micro_*`` pool tp / n_pred / n_gold over all records. ``micro_f1_ci95`` is a seeded
percentile bootstrap over records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmft.tasks.base import INSTRUCTION, Layout

NAME = "triples"
# The seed scripts' prompt. "\\n" is a literal backslash-n, exactly as the seed scripts have it.
DEFAULT_PROMPT = (
    '你现在是一个信息抽取模型，请你帮我抽取出关系内容为"性能故障", "部件故障", "组成"和 "检测工具"的相关三元组，'
    '三元组内部用"_"连接，三元组之间用\\n分割。文本：'
)
LAYOUTS = (Layout(("text",), "answer"), INSTRUCTION)
USES_LABELS = False
MULTI_REFERENCE = False
HEADLINE = "sample_f1"  # the seeds' metric, their table's 测试结果F1
COLUMNS = (("sample_f1", "F1", "f1"), ("micro_precision", "micro P", "f1"), ("micro_recall", "micro R", "f1"),
           ("micro_f1", "micro F1", "f1"), ("micro_f1_ci95", "F1 95% CI", "ci"),
           ("parse_failure_rate", "parse fail", "share"))

Triple = tuple[str, str, str]


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer's de-duplicated triples in first-seen order, its malformed lines and its non-empty line count."""

    triples: tuple[Triple, ...]
    malformed: tuple[str, ...]
    n_lines: int


def parse_triples(text: str) -> ParsedAnswer:
    """Parse one answer text by the rules in the module docstring."""
    triples: dict[Triple, None] = {}
    malformed: list[str] = []
    lines = [line.strip() for line in text.split("\n")]  # "\n" only, like the data; strip() eats "\r"
    lines = [line for line in lines if line]
    for line in lines:
        parts = [part.strip() for part in line.split("_")]
        if len(parts) == 3 and all(parts):
            triples[(parts[0], parts[1], parts[2])] = None
        else:
            malformed.append(line)
    return ParsedAnswer(tuple(triples), tuple(malformed), len(lines))


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Precision, recall and F1 with the empty-set conventions of the module docstring."""
    if n_pred == 0 and n_gold == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {
        "precision": tp / n_pred if n_pred else 0.0,
        "recall": tp / n_gold if n_gold else 0.0,
        "f1": 2 * tp / (n_pred + n_gold),
    }


def _counts(gold: ParsedAnswer, pred: ParsedAnswer) -> tuple[int, int, int]:
    return len(set(gold.triples) & set(pred.triples)), len(pred.triples), len(gold.triples)


def record_scores(gold: str, pred: str) -> dict:
    """Per-record precision/recall/F1, counts and parse failures, for the predict script's per-record output."""
    g, p = parse_triples(gold), parse_triples(pred)
    tp, n_pred, n_gold = _counts(g, p)
    return {**_prf(tp, n_pred, n_gold), "tp": tp, "n_pred": n_pred, "n_gold": n_gold,
            "parse_failures": len(p.malformed), "gold_malformed": len(g.malformed)}


def _per_relation(golds: list[ParsedAnswer], preds: list[ParsedAnswer], relations: list[str] | None) -> dict:
    """Relation -> {precision, recall, f1, support}; a relation with neither gold nor pred has None scores."""
    tp: dict[str, int] = {}
    n_pred: dict[str, int] = {}
    n_gold: dict[str, int] = {}
    for g, p in zip(golds, preds, strict=True):
        for t in g.triples:
            n_gold[t[1]] = n_gold.get(t[1], 0) + 1
        for t in p.triples:
            n_pred[t[1]] = n_pred.get(t[1], 0) + 1
        for t in set(g.triples) & set(p.triples):
            tp[t[1]] = tp.get(t[1], 0) + 1
    table = {}
    for rel in dict.fromkeys([*(relations or []), *sorted(n_gold), *sorted(n_pred)]):
        a, b, c = tp.get(rel, 0), n_pred.get(rel, 0), n_gold.get(rel, 0)
        scores = _prf(a, b, c) if b or c else dict.fromkeys(("precision", "recall", "f1"))
        table[rel] = {**scores, "support": c, "n_pred": b}
    return table


def _bootstrap_ci(counts: np.ndarray, n_bootstrap: int, seed: int) -> list[float] | None:
    """95% percentile interval of micro F1, resampling records with replacement; counts is [records, 3]."""
    if n_bootstrap <= 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(n_bootstrap, len(counts)))  # [resamples, records]
    sums = counts[idx].sum(axis=1)  # [resamples, 3] = tp, n_pred, n_gold
    denom = sums[:, 1] + sums[:, 2]
    f1 = np.where(denom > 0, 2 * sums[:, 0] / np.maximum(denom, 1), 1.0)
    low, high = np.percentile(f1, [2.5, 97.5])
    return [float(low), float(high)]


def score(golds: list[str], preds: list[str], *, relations: list[str] | None = None,
          n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Score generated answers against gold answers, one pair per record (see the module docstring); the result
    ends with ``per_record``."""
    if len(golds) != len(preds):
        raise ValueError(f"score() needs one prediction per gold answer: got {len(golds)} gold answers "
                         f"and {len(preds)} predictions")
    if not golds:
        raise ValueError("score() needs at least one record; got none")
    g_parsed = [parse_triples(text) for text in golds]
    p_parsed = [parse_triples(text) for text in preds]
    counts = np.array([_counts(g, p) for g, p in zip(g_parsed, p_parsed, strict=True)], dtype=np.int64)  # [records, 3]
    tp, n_pred, n_gold = (int(x) for x in counts.sum(axis=0))
    micro = _prf(tp, n_pred, n_gold)
    failures = sum(len(p.malformed) for p in p_parsed)
    pred_lines = sum(p.n_lines for p in p_parsed)
    result = {
        "sample_f1": float(np.mean([_prf(*row)["f1"] for row in counts.tolist()])),
        "micro_precision": micro["precision"],
        "micro_recall": micro["recall"],
        "micro_f1": micro["f1"],
        "micro_f1_ci95": _bootstrap_ci(counts, n_bootstrap, seed),
        "n_bootstrap": n_bootstrap,
        "per_relation": _per_relation(g_parsed, p_parsed, relations),
        "parse_failures": failures,
        "parse_failure_rate": failures / pred_lines if pred_lines else 0.0,
        "gold_malformed": sum(len(g.malformed) for g in g_parsed),
        "n_records": len(golds),
        "n_gold_triples": n_gold,
        "n_pred_triples": n_pred,
    }
    if relations is not None:
        result["unknown_relations"] = sorted(set(result["per_relation"]) - set(relations))
    # Per record: its scores and the triples read from the prediction (what predictions.jsonl shows).
    result["per_record"] = [{**record_scores(g, p), "triples": [list(t) for t in parse_triples(p).triples]}
                            for g, p in zip(golds, preds, strict=True)]
    return result


def _fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:.4f}"


def format_summary(metrics: dict) -> str:
    """A short human-readable summary of ``score``'s result."""
    m, ci = metrics, metrics.get("micro_f1_ci95")
    ci_text = f"  (95% CI {ci[0]:.4f}-{ci[1]:.4f}, {m.get('n_bootstrap')} resamples)" if ci else ""
    micro = f"{m['micro_precision']:.4f} / {m['micro_recall']:.4f} / {m['micro_f1']:.4f}"
    lines = [
        f"records {m['n_records']}, gold triples {m['n_gold_triples']}, predicted triples {m['n_pred_triples']}",
        f"sample F1 (seed metric, / {m['n_records']}): {m['sample_f1']:.4f}",
        f"micro P / R / F1: {micro}{ci_text}",
        f"parse failures: {m['parse_failures']} ({m['parse_failure_rate']:.1%} of generated lines); "
        + f"malformed gold lines: {m['gold_malformed']}",
        f"{'relation':<12} {'P':>7} {'R':>7} {'F1':>7} {'support':>8} {'pred':>6}",
    ]
    for rel, row in m["per_relation"].items():
        scores = " ".join(f"{_fmt(row[k]):>7}" for k in ("precision", "recall", "f1"))
        lines.append(f"{rel:<12} {scores} {row['support']:>8} {row['n_pred']:>6}")
    return "\n".join(lines)


def write_figures(metrics: dict, out_dir: Path) -> list[Path]:
    """Triples have no figure of their own."""
    return []
