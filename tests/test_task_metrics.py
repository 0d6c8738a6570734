"""Tests for glmft.tasks.generation and glmft.tasks.classification: their numbers equal the reference libraries'
(jieba + rouge_chinese + nltk; scikit-learn) computed here directly, on the awkward cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jieba
import pytest
from conftest import ROOT
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge
from sklearn.metrics import accuracy_score, f1_score

from glmft import tasks
from glmft.tasks import classification, generation

# (reference, prediction)
GEN_CASES = [
    ("今天天气不错，我们去公园散步。", "今天天气很好，我们去公园散步吧。"),
    ("这款连衣裙采用简约的设计，显瘦又百搭。", ""),  # empty prediction
    ("", "一条宽松的牛仔裤"),  # empty reference
    ("", ""),  # both empty
    ("参考文字", "  \n\t"),  # whitespace-only prediction
    ("。。。", "！？。"),  # punctuation only
    ("好的。", "，。！"),
    ("！？", "！？"),
    ("我用 python 写代码 very nice", "我用Python写code，very good"),  # mixed Chinese/English
    ("The cat is on the mat.", "the cat sat on the mat"),
    ("好好学习，天天向上", "好好好好好好"),  # repeated words
    ("的", "的的的的的的的的"),
    ("简约的连衣裙", "简约的连衣裙"),
    ("裙", "裙"),
]


def _direct(reference: str, prediction: str) -> dict[str, float]:
    """The THUDM recipe called straight on the libraries; whitespace-only texts, where rouge_chinese raises, score
    ROUGE 0 (the module docstring's convention)."""
    hyp, ref = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    if hyp.split() and ref.split():
        rouge = {k: v["f"] * 100 for k, v in Rouge().get_scores(hyp, ref)[0].items()}
    else:
        with pytest.raises(ValueError, match="is empty"):
            Rouge().get_scores(hyp, ref)
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {**rouge, "bleu-4": bleu * 100}


def test_generation_scores_equal_the_libraries_record_by_record_and_on_average():
    refs, preds = [r for r, _ in GEN_CASES], [p for _, p in GEN_CASES]
    result = generation.score(refs, preds)
    expected = [_direct(r, p) for r, p in GEN_CASES]
    assert result["n"] == len(GEN_CASES) and len(result["per_record"]) == len(GEN_CASES)
    for got, want in zip(result["per_record"], expected, strict=True):
        for name in generation.METRICS:
            assert got[name] == pytest.approx(want[name], abs=1e-6), name
    for name in generation.METRICS:
        mean = sum(e[name] for e in expected) / len(expected)
        assert result[name] == pytest.approx(mean, abs=1e-6), name
    assert 0 < result["rouge-l"] < 100 and 0 < result["bleu-4"] < 100  # the cases are not all 0 or all 100


def test_generation_empty_outputs_score_zero_stay_in_the_mean_and_are_counted():
    result = generation.score(["今天天气很好", "今天天气很好", "", "好"], ["", " \n", "", "好"])
    empty = [r["empty"] for r in result["per_record"]]
    assert empty == [True, True, True, False]
    for record in result["per_record"][:3]:
        assert all(record[name] == 0.0 for name in generation.METRICS)
    assert result["empty_rate"] == 0.75
    assert result["mean_length"] == pytest.approx((0 + 2 + 0 + 1) / 4)
    assert result["rouge-1"] == pytest.approx(result["per_record"][3]["rouge-1"] / 4)  # divided by all 4 records
    assert result["per_record"][3]["rouge-1"] == pytest.approx(100, abs=1e-6)


def test_generation_rejects_mismatched_or_non_string_input():
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        generation.score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no records"):
        generation.score([], [])
    with pytest.raises(TypeError, match="record 1"):
        generation.score(["a", "b"], ["a", None])


def test_generation_needs_no_network_no_nltk_data_and_prints_no_jieba_log(tmp_path):
    """A fresh process with the network cut, nltk.download disabled, no nltk_data and an empty temporary directory
    (so jieba builds its prefix dictionary from the packaged file and writes its cache there) scores quietly."""
    code = (
        "import socket, nltk\n"
        "def refuse(*a, **k): raise RuntimeError('network or download attempted')\n"
        "socket.socket.connect = refuse; nltk.download = refuse\n"
        "from glmft.tasks import generation\n"
        "print(generation.score(['今天天气很好'], ['今天天气不错'])['rouge-1'])\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "NLTK_DATA": str(tmp_path / "none"), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) > 0
    assert "prefix dict" not in done.stderr, done.stderr
    assert (tmp_path / "jieba.cache").is_file()


LABELS = ["体育", "财经", "科技", "娱乐"]
GOLDS = ["体育", "体育", "财经", "科技", "科技", "科技", "体育", "财经", "科技", "体育"]
PREDS = ["体育", "财经", "财经", "科技", "体育 ", "游戏", "", "财经", "科技", "invalid"]  # 4 outside the set


def test_classification_equals_sklearn_with_out_of_set_predictions_counted_wrong():
    result = classification.score(GOLDS, PREDS, LABELS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that 娱乐 has no support; it scores 0 either way
        macro = f1_score(GOLDS, PREDS, average="macro", labels=LABELS)
    assert result["accuracy"] == pytest.approx(accuracy_score(GOLDS, PREDS), abs=1e-6)
    assert result["accuracy"] == pytest.approx(5 / 10)
    assert result["macro_f1"] == pytest.approx(macro, abs=1e-6)
    assert result["invalid_rate"] == pytest.approx(4 / 10)  # "体育 " is not stripped here: the caller strips
    assert result["n"] == 10
    assert [r["correct"] for r in result["per_record"]] == [g == p for g, p in zip(GOLDS, PREDS, strict=True)]
    assert [r["valid"] for r in result["per_record"]] == [p in LABELS for p in PREDS]


def test_classification_confusion_matrix_has_an_invalid_column_and_counts_every_record():
    result = classification.score(GOLDS, PREDS, LABELS)
    assert result["confusion_columns"] == [*LABELS, "invalid"]
    assert result["confusion"] == [
        [1, 1, 0, 0, 2],  # 体育: right, as 财经, "" and "invalid" are invalid
        [0, 2, 0, 0, 0],  # 财经
        [0, 0, 2, 0, 2],  # 科技: right twice, "体育 " and 游戏 invalid
        [0, 0, 0, 0, 0],  # 娱乐: never gold
    ]
    assert sum(map(sum, result["confusion"])) == len(GOLDS)
    json.dumps(result)  # goes into metrics.json as is


def test_classification_all_correct_and_all_invalid_extremes():
    perfect = classification.score(["a", "b"], ["a", "b"], ["a", "b"])
    assert (perfect["accuracy"], perfect["macro_f1"], perfect["invalid_rate"]) == (1.0, 1.0, 0.0)
    junk = classification.score(["a", "b"], ["x", "y"], ["a", "b"])
    assert (junk["accuracy"], junk["macro_f1"], junk["invalid_rate"]) == (0.0, 0.0, 1.0)


def test_classification_rejects_gold_labels_outside_the_set_and_bad_label_sets():
    with pytest.raises(ValueError, match=r"record 1: gold label '足球'"):
        classification.score(["体育", "足球"], ["体育", "体育"], LABELS)
    with pytest.raises(ValueError, match="without repeats"):
        classification.score(["a"], ["a"], ["a", "a"])
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        classification.score(["a", "a"], ["a"], ["a"])


def test_confusion_png_is_written_without_missing_glyph_warnings(tmp_path):
    result = classification.score(GOLDS, PREDS, LABELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Chinese tick without a CJK font would warn "Glyph ... missing"
        path = classification.plot_confusion(result["confusion"], LABELS, tmp_path / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tasks_are_looked_up_by_name():
    assert tasks.get("generation") is generation and tasks.get("classification") is classification
    assert generation.HEADLINE in generation.score(["好"], ["好"])
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        tasks.get("poetry")
