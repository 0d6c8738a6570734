"""Tests for glmft.tasks.triples: parsing rules, per-record and corpus scores, bootstrap CI."""

import json
from pathlib import Path

import numpy as np
import pytest

from glmft.tasks.triples import _bootstrap_ci, format_summary, parse_triples, record_scores, score

SPO_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "spo" / "spo_1.json"


@pytest.mark.parametrize(
    "text, triples, malformed, n_lines",
    [
        ("", (), (), 0),
        ("  \n\n \t\n", (), (), 0),
        ("a_r_b", (("a", "r", "b"),), (), 1),
        ("c_r_d\na_r_b\nc_r_d", (("c", "r", "d"), ("a", "r", "b")), (), 3),  # de-duplicated, first-seen order
        ("  a _ r_ b  \n\n", (("a", "r", "b"),), (), 1),  # whitespace around parts and blank lines
        ("a b_r_c d", (("a b", "r", "c d"),), (), 1),  # inner whitespace is kept
        ("a_r_b\r\nc_r_d\r\n", (("a", "r", "b"), ("c", "r", "d")), (), 2),  # CRLF
        ("a_b", (), ("a_b",), 1),
        ("a_b_c_d", (), ("a_b_c_d",), 1),
        ("_b_c", (), ("_b_c",), 1),
        ("a_ _c", (), ("a_ _c",), 1),
        ("a_r_b\n a_b \nx", (("a", "r", "b"),), ("a_b", "x"), 3),
    ],
)
def test_parse_triples(text, triples, malformed, n_lines):
    parsed = parse_triples(text)
    assert parsed.triples == triples
    assert parsed.malformed == malformed
    assert parsed.n_lines == n_lines


@pytest.mark.parametrize(
    "gold, pred, tp, n_pred, n_gold, precision, recall, f1, failures",
    [
        ("a_r_b", "", 0, 0, 1, 0.0, 0.0, 0.0, 0),  # empty output
        ("a_r_b", " \n\n ", 0, 0, 1, 0.0, 0.0, 0.0, 0),  # whitespace-only output
        ("a_r_b\nc_r_d", "a_r_b\na_r_b", 1, 1, 2, 1.0, 0.5, 2 / 3, 0),  # duplicate in pred counts once
        ("a_r_b\na_r_b", "a_r_b", 1, 1, 1, 1.0, 1.0, 1.0, 0),  # duplicate in gold counts once
        ("a_r_b\nc_r_d", "c_r_d\na_r_b", 2, 2, 2, 1.0, 1.0, 1.0, 0),  # order does not matter
        ("a_r_b", "a_r_b\na_b", 1, 1, 1, 1.0, 1.0, 1.0, 1),  # a_b: failure, not a triple
        ("a_r_b", "a_r_b_x", 0, 0, 1, 0.0, 0.0, 0.0, 1),  # a_b_c_d: failure, not re-split
        ("a_r_b", "_r_b", 0, 0, 1, 0.0, 0.0, 0.0, 1),  # empty part: failure
        ("a_r_b", "\n  a _ r_ b  \n\n", 1, 1, 1, 1.0, 1.0, 1.0, 0),  # whitespace and blank lines
        ("", "", 0, 0, 0, 1.0, 1.0, 1.0, 0),  # empty gold, empty pred: perfect (the seeds scored 0)
        (" \n ", "\n", 0, 0, 0, 1.0, 1.0, 1.0, 0),  # all-whitespace gold means no triples
        ("", "a_r_b", 0, 1, 0, 0.0, 0.0, 0.0, 0),  # empty gold, non-empty pred
        ("a_r_b", "a_unknown_b", 0, 1, 1, 0.0, 0.0, 0.0, 0),  # unknown relation is a triple that cannot match
    ],
)
def test_record_scores(gold, pred, tp, n_pred, n_gold, precision, recall, f1, failures):
    s = record_scores(gold, pred)
    assert (s["tp"], s["n_pred"], s["n_gold"], s["parse_failures"]) == (tp, n_pred, n_gold, failures)
    assert s["precision"] == pytest.approx(precision)
    assert s["recall"] == pytest.approx(recall)
    assert s["f1"] == pytest.approx(f1)


def test_seed_sample_f1_on_hand_computed_case():
    # Seed metric: per record p = |same|/|set(pred)|, r = |same|/|set(gold)|, f = 2pr/(p+r), then averaged.
    # record 1: gold {A,B,C}, pred {A,B,D}   -> p = 2/3, r = 2/3, f = 2/3
    # record 2: gold {A,B},   pred {A,A}     -> p = 1,   r = 1/2, f = 2*(1/2)/(3/2) = 2/3
    # record 3: gold {A},     pred {X}       -> p = 0,   r = 0,   f = 0
    # sample F1 = (2/3 + 2/3 + 0) / 3 = 4/9  (the seeds' "/ 50" would have printed (4/3)/50 = 0.0267)
    # micro: tp = 2+1+0 = 3, n_pred = 3+1+1 = 5, n_gold = 3+2+1 = 6 -> P = 3/5, R = 1/2, F1 = 6/11
    golds = ["a_r_1\nb_r_2\nc_r_3", "a_r_1\nb_r_2", "a_r_1"]
    preds = ["a_r_1\nb_r_2\nd_r_4", "a_r_1\na_r_1", "x_r_9"]
    m = score(golds, preds, n_bootstrap=0)
    assert m["sample_f1"] == pytest.approx(4 / 9)
    assert (m["micro_precision"], m["micro_recall"]) == pytest.approx((3 / 5, 1 / 2))
    assert m["micro_f1"] == pytest.approx(6 / 11)
    assert (m["n_records"], m["n_gold_triples"], m["n_pred_triples"]) == (3, 6, 5)
    assert m["micro_f1_ci95"] is None


@pytest.mark.parametrize("n_records", [1, 4, 50, 73])
def test_sample_f1_divides_by_real_record_count(n_records):
    # Every other record is perfect, the rest score 0: the mean must be the fraction of perfect records.
    golds = ["a_r_b"] * n_records
    preds = ["a_r_b" if i % 2 == 0 else "" for i in range(n_records)]
    m = score(golds, preds, n_bootstrap=0)
    assert m["sample_f1"] == pytest.approx(((n_records + 1) // 2) / n_records)


def test_per_relation_hand_computed():
    # fault: gold {e_noise, a_b}, pred {e_noise, a_b, c_d} -> tp 2, P 2/3, R 1, F1 2*2/(3+2) = 0.8, support 2
    # part:  gold {p_e},          pred {p_x}               -> tp 0, all 0, support 1
    # other: no gold,             pred {q_z}               -> tp 0, all 0, support 0 (not in the known set)
    # tool:  known, neither gold nor pred                  -> None scores, support 0
    golds = ["e_fault_noise\np_part_e", "a_fault_b"]
    preds = ["e_fault_noise\np_part_x", "a_fault_b\nc_fault_d\nq_other_z"]
    m = score(golds, preds, relations=["fault", "part", "tool"], n_bootstrap=0)
    table = m["per_relation"]
    assert list(table) == ["fault", "part", "tool", "other"]
    assert (table["fault"]["precision"], table["fault"]["recall"], table["fault"]["f1"]) == pytest.approx(
        (2 / 3, 1.0, 0.8))
    assert table["fault"]["support"] == 2
    assert (table["part"]["f1"], table["part"]["support"]) == (0.0, 1)
    assert (table["other"]["precision"], table["other"]["support"], table["other"]["n_pred"]) == (0.0, 0, 1)
    assert (table["tool"]["f1"], table["tool"]["support"]) == (None, 0)
    assert m["unknown_relations"] == ["other"]


def test_per_relation_without_known_set_lists_only_seen_relations():
    m = score(["a_r_b"], ["a_s_b"], n_bootstrap=0)
    assert set(m["per_relation"]) == {"r", "s"}
    assert "unknown_relations" not in m


def test_parse_failures_and_gold_malformed():
    golds = ["a_r_b\nbad_gold", "c_r_d"]
    preds = ["a_r_b\na_b\n\n", "x_y_z_w\n_r_d\nc_r_d"]
    m = score(golds, preds, n_bootstrap=0)
    assert m["parse_failures"] == 3
    assert m["parse_failure_rate"] == pytest.approx(3 / 5)  # 5 non-empty generated lines
    assert m["gold_malformed"] == 1
    assert m["n_gold_triples"] == 2  # the malformed gold line is kept out of the gold set
    assert m["micro_f1"] == 1.0


def test_all_empty_corpus_is_perfect_and_has_no_failures():
    m = score(["", " "], ["", "\n"], n_bootstrap=10)
    assert (m["sample_f1"], m["micro_f1"], m["parse_failure_rate"]) == (1.0, 1.0, 0.0)
    assert m["micro_f1_ci95"] == [1.0, 1.0]


def _mixed_corpus(n: int = 50) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(123)
    golds, preds = [], []
    for i in range(n):
        gold = [f"s{i}_r{j % 3}_o{j}" for j in range(rng.integers(1, 6))]
        kept = [t for t in gold if rng.random() < 0.7] + [f"x{i}_r0_y"] * int(rng.random() < 0.3)
        golds.append("\n".join(gold))
        preds.append("\n".join(kept))
    return golds, preds


def test_bootstrap_is_deterministic_and_contains_point_estimate():
    golds, preds = _mixed_corpus()
    first = score(golds, preds, seed=7)
    second = score(golds, preds, seed=7)
    low, high = first["micro_f1_ci95"]
    assert first["micro_f1_ci95"] == second["micro_f1_ci95"]
    assert low < first["micro_f1"] < high
    assert 0.0 <= low and high <= 1.0


def test_bootstrap_of_identical_records_is_a_point():
    m = score(["a_r_b\nc_r_d"] * 20, ["a_r_b\nx_r_y"] * 20, seed=3)
    assert m["micro_f1"] == pytest.approx(0.5)
    assert m["micro_f1_ci95"] == [m["micro_f1"], m["micro_f1"]]


def test_bootstrap_ci_is_ordered_and_seeded():
    rng = np.random.default_rng(0)
    n_pred, n_gold = rng.integers(1, 6, size=(2, 50))
    tp = rng.integers(0, np.minimum(n_pred, n_gold) + 1)
    counts = np.stack([tp, n_pred, n_gold], axis=1)  # [records, 3] = tp, n_pred, n_gold
    low, high = _bootstrap_ci(counts, 1000, 0)
    assert 0.0 <= low < high <= 1.0
    assert _bootstrap_ci(counts, 1000, 0) == [low, high]
    assert _bootstrap_ci(counts, 1000, 1) != [low, high]


@pytest.mark.parametrize("golds, preds", [(["a_r_b"], []), ([], ["a_r_b"]), (["a_r_b"] * 3, ["a_r_b"] * 2)])
def test_length_mismatch_raises(golds, preds):
    with pytest.raises(ValueError, match=f"got {len(golds)} gold answers and {len(preds)} predictions"):
        score(golds, preds)


def test_no_records_raises():
    with pytest.raises(ValueError, match="at least one record"):
        score([], [])


def test_format_summary_mentions_every_section():
    golds = ["e_fault_noise\np_part_e", "a_fault_b"]
    preds = ["e_fault_noise\np_part_x\nbad", "a_fault_b"]
    text = format_summary(score(golds, preds, relations=["fault", "part", "tool"], n_bootstrap=100))
    assert "sample F1" in text and "micro P / R / F1" in text and "95% CI" in text
    assert "parse failures: 1" in text
    assert all(rel in text for rel in ("fault", "part", "tool"))


@pytest.mark.skipif(not SPO_TEST.exists(), reason="seed test split not available")
def test_seed_test_split_gold_against_itself_and_first_triple_oracle():
    golds = [json.loads(line)["answer"] for line in SPO_TEST.read_text(encoding="utf-8").splitlines()]
    perfect = score(golds, golds, n_bootstrap=0)
    assert (perfect["n_records"], perfect["n_gold_triples"], perfect["gold_malformed"]) == (50, 203, 0)
    assert perfect["sample_f1"] == perfect["micro_f1"] == 1.0
    # The data README: first-gold-triple oracle scores 0.536 on the seed metric and 0.395 micro-F1.
    oracle = score(golds, [g.split("\n")[0] for g in golds], n_bootstrap=0)
    assert oracle["sample_f1"] == pytest.approx(0.536, abs=5e-4)
    assert oracle["micro_f1"] == pytest.approx(0.395, abs=5e-4)
