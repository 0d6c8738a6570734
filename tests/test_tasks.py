"""The Task layer end to end (issue 12): the task contract, record layouts per task, --task through training
arguments, meta.json, predict (base model, label sets, constrained labels) and the report's task columns."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import chatglm
from glmft import checkpoint, compare, predict, report, tasks
from glmft.args import TrainArgs
from glmft.data import DataError, SupervisedDataset, read_records
from glmft.decode import LabelTrie
from glmft.tasks.base import Layout
from glmft.train import meta_record
from glmft.tuners import TUNERS

DATA = ROOT / "data"
CLS_TRAIN, CLS_TEST = DATA / "sample_classification_train.jsonl", DATA / "sample_classification_test.jsonl"
GEN_TRAIN, GEN_TEST = DATA / "sample_generation_train.jsonl", DATA / "sample_generation_test.jsonl"
LABELS = json.loads((DATA / "labels.json").read_text(encoding="utf-8"))


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ---- the contract -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_module_follows_the_contract(name):
    task = tasks.get(name)
    assert task.NAME == name and isinstance(task.DEFAULT_PROMPT, str)
    assert task.LAYOUTS and all(isinstance(layout, Layout) for layout in task.LAYOUTS)
    assert isinstance(task.USES_LABELS, bool) and isinstance(task.MULTI_REFERENCE, bool)
    assert [k for k, _, _ in task.COLUMNS].count(task.HEADLINE) == 1
    for fn in ("score", "record_scores", "format_summary", "write_figures"):
        assert callable(getattr(task, fn)), fn
    golds = ["体育", "财经"] if task.USES_LABELS else ["a_r_b", "c_r_d"]
    result = tasks.score(task, golds, [golds[0], "x"], ["体育", "财经"])
    assert task.HEADLINE in result and len(result["per_record"]) == 2
    assert all(key in result for key, _, kind in task.COLUMNS if kind != "ci")
    assert isinstance(task.format_summary({k: v for k, v in result.items() if k != "per_record"}), str)


def test_triples_moved_into_the_task_layer_and_is_the_default():
    assert tasks.DEFAULT == "triples" and tasks.get("triples").DEFAULT_PROMPT.startswith("你现在是一个信息抽取模型")
    with pytest.raises(ModuleNotFoundError):
        __import__("glmft.metrics")
    with pytest.raises(ValueError, match="unknown task 'summarise'; known: triples, generation, classification"):
        tasks.get("summarise")


def test_no_module_outside_the_task_layer_mentions_triples():
    code = [*ROOT.glob("*.py"), *(ROOT / "glmft").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    # the task's word, not AdaLoRA's "triplets" (of singular vectors)
    mentions = [p for p in code if re.search(r"\btriples?\b", p.read_text(encoding="utf-8"), re.IGNORECASE)
                and "tasks" not in p.relative_to(ROOT).parts]
    assert mentions == []


# ---- records ------------------------------------------------------------------------------------------------------
def test_each_task_reads_its_layouts_with_its_prompt(tmp_path):
    adgen = read_records(GEN_TRAIN, task="generation")
    assert len(adgen) == 40 and adgen[0].source == adgen[0].text and adgen[0].target.endswith("。")  # no prompt
    news = read_records(CLS_TRAIN, task="classification")
    assert {r.target for r in news} == set(LABELS)
    assert news[0].source == tasks.get("classification").DEFAULT_PROMPT + news[0].text
    rows = [{"text": "t", "answer": "a"}, {"instruction": "说：", "input": "t", "output": "a"}]
    for task in tasks.TASKS:
        first, second = read_records(write_lines(tmp_path / f"{task}.jsonl", rows), task=task)
        assert (first.target, second.source, second.target) == ("a", "说：t", "a")
    own = read_records(write_lines(tmp_path / "own.jsonl", [{"q": "问", "reply": "答", "id": 3}]), prompt_text="P:",
                       task="generation", input_key="q", target_key="reply")
    assert (own[0].source, own[0].target) == ("P:问", "答")


@pytest.mark.parametrize("task, row, what", [
    ("generation", {"content": "a"}, "field 'summary' is missing"),
    ("generation", {"content": 3, "summary": "b"}, "field 'content' must be a string, got int"),
    ("classification", {"text": "a", "label": 1}, "field 'label' must be a string, got int"),
    ("classification", {"text": "a"}, "field 'label' or 'answer' is missing"),
    ("classification", {"text": "a", "label": "b", "answer": "c"}, "keys of both layouts"),
    ("classification", {"text": "a", "label": ["b"]}, "field 'label' must be a string, got list"),
    ("generation", {"content": "a", "summary": []}, "field 'summary' must be a string or a non-empty list"),
    ("triples", {"content": "a", "summary": "b"}, "none of the expected keys"),
])
def test_missing_or_non_string_fields_name_file_line_and_field(tmp_path, task, row, what):
    path = write_lines(tmp_path / "bad.jsonl", [{"text": "x", "answer": "y"}, row])
    if task != "triples":
        path = write_lines(tmp_path / "bad.jsonl", ["", row])
    with pytest.raises(DataError) as err:
        read_records(path, task=task)
    assert str(err.value).startswith(f"{path}:2: ") and what in str(err.value)


def test_custom_keys_name_the_missing_field(tmp_path):
    path = write_lines(tmp_path / "own.jsonl", [{"q": "a"}])
    with pytest.raises(DataError, match=r"own\.jsonl:1: field 'reply' is missing"):
        read_records(path, task="generation", input_key="q", target_key="reply")
    with pytest.raises(ValueError, match="--input_key .* and --target_key .* go together"):
        TrainArgs(input_key="q")


def test_several_references_are_for_test_files_of_generation(tmp_path):
    path = write_lines(tmp_path / "d2q.jsonl", [{"instruction": "问：", "input": "文档", "output": ["问一", "问二"]}])
    record = read_records(path, task="generation")[0]
    assert record.gold == ["问一", "问二"] and record.target == "问一"
    with pytest.raises(DataError, match=r"d2q\.jsonl:1: the target lists 2 references; a training record needs one"):
        SupervisedDataset(path, chatglm.ChatGLMTokenizer.from_pretrained(chatglm.TINY_DIR), 128, 64, None,
                          "generation")
    scores = tasks.get("generation").score([["今天天气很好", "明天下雨"]], ["明天下雨"])
    assert scores["rouge-l"] == pytest.approx(100.0)  # the best of the references


# ---- training arguments -------------------------------------------------------------------------------------------
def test_task_gives_the_prompt_and_classification_resolves_its_labels(tmp_path):
    assert TrainArgs().task == "triples" and TrainArgs().labels == []
    assert TrainArgs(task="generation").prompt_text == ""
    assert TrainArgs(task="generation", prompt_text="写：").prompt_text == "写："
    beside = TrainArgs(task="classification", train_path=str(CLS_TRAIN))
    assert beside.labels == LABELS  # data/labels.json, in its order
    train = write_lines(tmp_path / "train.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"},
                                                   {"text": "c", "label": "neg"}])
    assert TrainArgs(task="classification", train_path=str(train)).labels == ["neg", "pos"]  # sorted, once each
    assert TrainArgs(task="classification", train_path=str(train), labels="pos,neg,mid").labels == ["pos", "neg",
                                                                                                     "mid"]
    (tmp_path / "labels.json").write_text('["pos", "neg"]')
    assert TrainArgs(task="classification", train_path=str(train)).labels == ["pos", "neg"]
    with pytest.raises(DataError, match=r"train\.jsonl:1: label 'neg' is not in the label set \(--labels"):
        TrainArgs(task="classification", train_path=str(train), labels="pos")
    with pytest.raises(ValueError, match="--labels is for a task with a label set; the generation task has none"):
        TrainArgs(task="generation", labels="a,b")
    with pytest.raises(ValueError, match="unknown task"):
        TrainArgs(task="qa")


# ---- meta.json and predict ----------------------------------------------------------------------------------------
def lora_checkpoint(base_dir, directory: Path, **train_args) -> Path:
    tuner = TUNERS["lora"]
    args = tuner.Args(lora_r=4)
    torch.manual_seed(0)
    model = tuner.apply(chatglm.ChatGLMForConditionalGeneration.from_pretrained(base_dir), args)
    train = TrainArgs(model_dir=str(base_dir), max_len=128, max_src_len=64, **train_args)
    return checkpoint.save(model, directory, meta_record(train, args, tuner, {}, step=2, epoch=0), tuner)


def test_meta_json_carries_the_task_and_predict_scores_with_it(base_dir, tmp_path):
    ckpt = lora_checkpoint(base_dir, tmp_path / "ckpt", task="classification", train_path=str(CLS_TRAIN))
    data = checkpoint.read_meta(ckpt)["data"]
    assert (data["task"], data["labels"], data["input_key"], data["target_key"]) == ("classification", LABELS, "", "")
    assert data["prompt_text"] == tasks.get("classification").DEFAULT_PROMPT
    test = write_lines(tmp_path / "test.jsonl", [json.loads(x) for x in CLS_TEST.read_text().splitlines()])  # no
    # labels.json beside it: the checkpoint's training labels are used
    result = predict.run(predict.PredictArgs(ckpt_dir=str(ckpt), test_path=str(test), max_new_tokens=3))
    assert result["task"] == "classification" and result["label_source"].startswith("the checkpoint's training")
    assert {"accuracy", "macro_f1", "invalid_rate", "confusion"} <= result.keys() and result["invalid_rate"] > 0
    saved = json.loads((ckpt / "predict" / "metrics.json").read_text())
    assert saved["confusion"] == result["confusion"] and "per_record" not in saved
    assert (ckpt / "predict" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (ckpt / "predict" / "predictions.jsonl").open()]
    assert len(rows) == 15 and set(rows[0]["scores"]) == {"correct", "valid"}
    constrained = predict.run(predict.PredictArgs(ckpt_dir=str(ckpt), test_path=str(test), constrain_labels=True,
                                                  output_dir=str(tmp_path / "constrained"), num_beams=2))
    answers = [json.loads(line)["generated"] for line in (tmp_path / "constrained" / "predictions.jsonl").open()]
    assert set(answers) <= set(LABELS) and constrained["invalid_rate"] == 0.0


def test_checkpoint_without_a_task_in_meta_json_is_read_as_triples(base_dir, tmp_path):
    ckpt = lora_checkpoint(base_dir, tmp_path / "ckpt")
    meta = checkpoint.read_meta(ckpt)
    for key in ("task", "input_key", "target_key", "labels"):
        del meta["data"][key]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    result = predict.run(predict.PredictArgs(ckpt_dir=str(ckpt), limit=2, max_new_tokens=2), TUNERS["lora"])
    assert result["task"] == "triples" and "micro_f1" in result
    with pytest.raises(ValueError, match="--task generation: the checkpoint learnt the triples task"):
        predict.run(predict.PredictArgs(ckpt_dir=str(ckpt), task="generation"))


def test_base_model_predicts_without_a_checkpoint(base_dir, tmp_path):
    args = predict.PredictArgs(model_dir=str(base_dir), task="generation", test_path=str(GEN_TEST), max_new_tokens=4,
                               output_dir=str(tmp_path / "base"))
    result = predict.run(args)
    assert (result["method"], result["checkpoint"], result["task"], result["n_records"]) == ("base", None,
                                                                                          "generation", 12)
    assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "mean_length", "empty_rate"} <= result.keys()
    with pytest.raises(ValueError, match="--ckpt_dir is required: predict_lora.py scores a lora checkpoint"):
        predict.run(args, TUNERS["lora"])
    with pytest.raises(ValueError, match="--ckpt_dir is required"):
        predict.PredictArgs()


def test_label_trie_allows_only_label_continuations():
    tok = chatglm.ChatGLMTokenizer.from_pretrained(chatglm.TINY_DIR)
    trie = LabelTrie(tok, ["发动机", "制动", "变速箱"])
    ids = {label: tok.encode(label, add_special_tokens=False) for label in ("发动机", "制动", "变速箱")}
    assert set(trie.allowed([])) == {ids[label][0] for label in ids}
    assert trie.allowed(ids["制动"]) == [tok.eos_token_id]
    assert trie.allowed([*ids["制动"], tok.eos_token_id, tok.pad_token_id]) == [tok.eos_token_id]  # finished row
    assert trie.longest == max(len(v) for v in ids.values())
    with pytest.raises(ValueError, match="round trip"):
        LabelTrie(tok, ["  空格 "])


# ---- compare and the report ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, column, plot", [("triples", "测试结果F1", "f1_vs_memory.png"),
                                                ("generation", "测试结果ROUGE-L", "rouge-l_vs_memory.png"),
                                                ("classification", "测试结果accuracy", "accuracy_vs_memory.png")])
def test_report_columns_and_plot_follow_the_task(tmp_path, task, column, plot):
    module = tasks.get(task)
    golds = LABELS[:2] if module.USES_LABELS else ["今天_是_晴天", "b_r_c"]
    metrics = tasks.score(module, golds, golds, LABELS)
    metrics.pop("per_record")
    runs = [{"variant": "base", "method": "base", "seed": 1, "status": "ok", "metrics": {**metrics, "task": task}},
            {"variant": "lora", "method": "lora", "seed": 1, "status": "ok", "learning_rate": 1e-3,
             "train": {"trainable_params": 1, "all_params": 10, "peak_mem_gb": 0.5}, "metrics": {**metrics,
                                                                                                 "task": task}}]
    settings = {**dataclasses.asdict(compare.CompareArgs()), "device": "cpu", "zero_stage": 1}
    written = report.write(tmp_path, runs, settings)
    assert Path(written[-1]).name == plot and (tmp_path / plot).is_file()
    table = (tmp_path / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert column in header and all(h in header for k, h, _ in module.COLUMNS if k != module.HEADLINE)
    assert "| base |" in table and f"Task {task}." in table


def test_compare_passes_the_task_on_and_scores_the_base_model(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(compare.launch, "execute", lambda cmd, log: (ran.append(cmd), (1, 0.0, "boom"))[1])
    args = compare.CompareArgs(task="classification", train_path=str(CLS_TRAIN), test_path=str(CLS_TEST),
                               methods="lora", base=True, constrain_labels=True, output_dir=str(tmp_path))
    argv = compare.train_argv(args, "lora", 1, 1e-3)
    assert argv[argv.index("--task") + 1] == "classification" and "--labels" not in argv
    result = compare.run_one(args, compare.BASE, 1, tmp_path / "ds.json")
    cmd = ran[-1]
    assert Path(cmd[1]).name == "predict.py" and "--ckpt_dir" not in cmd and "--constrain_labels" in cmd
    assert cmd[cmd.index("--task") + 1] == "classification"
    assert json.loads(Path(cmd[cmd.index("--labels") + 1]).read_text()) == LABELS
    assert result["stage"] == "predict"
    with pytest.raises(ValueError, match="need a task with a label set"):
        compare.CompareArgs(constrain_labels=True)
    with pytest.raises(ValueError, match="--task is set by compare.py"):
        compare.CompareArgs(method_option=("lora=--task generation",))


# ---- every method, each task, end to end --------------------------------------------------------------------------
LOOP = """
import json, sys
from pathlib import Path
from glmft import args, predict, train
from glmft.tuners import TUNERS
OPTIONS = {"freeze": ["--num_trainable_layers", "1"], "pt": ["--pre_seq_len", "4"], "lora": ["--lora_r", "4"],
           "adapter": ["--adapter_size", "8"]}
task, work = sys.argv[1], Path(sys.argv[2])
found = {}
for name, tuner in TUNERS.items():
    argv = ["--model_dir", "tiny", "--task", task, "--train_path", f"data/sample_{task}_train.jsonl", "--max_steps",
            "2", "--max_len", "128", "--max_src_len", "64", "--output_dir", str(work / name), *OPTIONS.get(name, [])]
    ckpt = train.run(*args.parse(tuner, argv), tuner)
    settings = predict.PredictArgs(ckpt_dir=str(ckpt), test_path=f"data/sample_{task}_test.jsonl", max_new_tokens=4,
                                   constrain_labels=task == "classification")
    found[name] = {"metrics": predict.run(settings), "meta": json.loads((ckpt / "meta.json").read_text())}
print("RESULT " + json.dumps(found, ensure_ascii=False, default=str))
"""


@pytest.mark.slow
@pytest.mark.parametrize("task", ["generation", "classification"])
def test_every_method_trains_and_predicts_the_task(tmp_path, task):
    """One process per task runs every tuner of the table in turn: train 2 steps, predict the test sample."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOOP, task, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.split("RESULT ", 1)[1])
    module = tasks.get(task)
    assert list(found) == list(TUNERS)
    for name, run in found.items():
        metrics = run["metrics"]
        assert run["meta"]["method"] == name and run["meta"]["data"]["task"] == task
        assert metrics["task"] == task and metrics["method"] == name and metrics["n_records"] in (12, 15)
        assert isinstance(metrics[module.HEADLINE], float)
        if module.USES_LABELS:  # constrained: every answer is a label
            assert metrics["invalid_rate"] == 0.0 and run["meta"]["data"]["labels"] == LABELS
            assert sum(map(sum, metrics["confusion"])) == 15
        rows = [json.loads(x) for x in (tmp_path / name / "checkpoint-2" / "predict" / "predictions.jsonl").open()]
        assert len(rows) == metrics["n_records"]
