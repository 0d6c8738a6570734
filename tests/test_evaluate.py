"""Evaluation while training (glmft/evaluate.py): shards, the eval loss against a direct computation, the loop's
evaluations and --save_best with a stand-in engine, retention of the best checkpoint, and one real DeepSpeed run in
this process (TensorBoard, train_summary.json, meta.json, the headline metric). The two-rank shard sum is checked
against one rank in tests/test_scripts.py (test_two_gloo_ranks_share_the_eval_loss)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_loop import BATCH, Engine, Sampler, fake_dist  # noqa: F401 (fake_dist: a fixture)

from glmft import checkpoint, evaluate, rundir
from glmft import train as train_module
from glmft.args import TrainArgs
from glmft.data import IGNORE_INDEX
from glmft.evaluate import Evaluator
from glmft.model import build_model, load_tokenizer
from glmft.train import loop, read_data
from glmft.tuners import lora

ROOT = Path(__file__).resolve().parents[1]
TINY = TrainArgs(model_dir="tiny", max_len=128, max_src_len=64)


def direct_eval_loss(model, examples) -> float:
    """Summed next-token NLL over every supervised token of every example, one unpadded example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(ex["labels"][1:])
            picked = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[picked], targets[picked], reduction="sum").item()
            count += int(picked.sum())
    return total / count


@pytest.mark.parametrize("n,world,batch", [(12, 1, 5), (5, 2, 2), (7, 3, 2), (1, 2, 4), (6, 2, 3)])
def test_every_rank_runs_as_many_batches_and_the_real_ones_cover_each_record_once(n, world, batch):
    items = list(range(n))
    per_rank = [list(evaluate.rank_batches(items, rank, world, batch)) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1, "ranks would wait for each other in a collective"
    real = [i for batches in per_rank for chunk, is_real in batches if is_real for i in chunk]
    assert sorted(real) == items
    assert all(chunk for batches in per_rank for chunk, _ in batches)


def test_eval_loss_is_the_mean_nll_per_supervised_token_whatever_the_batching():
    tokenizer, model = load_tokenizer("tiny"), build_model("tiny").eval()
    examples = read_data(str(ROOT / "data" / "sample_test.jsonl"), tokenizer, TINY).examples
    expected = direct_eval_loss(model, examples)
    for batch in (1, 5, 12):  # uneven last batch, right padding
        got = evaluate.eval_loss(model, examples, batch, tokenizer.pad_token_id, torch.device("cpu"))
        assert got == pytest.approx(expected, rel=1e-6), batch


def scripted(values):
    it = iter(values)
    return lambda: {"eval/loss": next(it)}


def run_loop(tmp_path, steps: int, evaluator: Evaluator, **options) -> list:
    saves: list = []
    engine = Engine("cpu", 1)
    batch = {"input_ids": torch.ones(BATCH, 8, dtype=torch.long), "labels": torch.ones(BATCH, 8, dtype=torch.long),
             "attention_mask": torch.ones(BATCH, 8, dtype=torch.long)}
    dataset = type("D", (), {"records": [type("R", (), {"line": i + 1})() for i in range(steps * BATCH)]})()
    train = TrainArgs(output_dir=str(tmp_path), max_steps=steps, learning_rate=0.1, train_batch_size=BATCH,
                      eval_path="data/sample_test.jsonl", **options)
    loop(engine, [batch] * steps, Sampler(range(steps * BATCH)), dataset, train, steps,
         {"step": 0, "epoch": 0, "batch": 0}, save=lambda step, position: saves.append((step, position)),
         info={"method": "lora"}, evaluator=evaluator)
    return saves


def test_the_loop_evaluates_logs_and_saves_every_improvement_with_save_best(tmp_path, fake_dist):  # noqa: F811
    losses = [3.0, 1.0, 2.0, 0.5, 4.0]
    evaluator = Evaluator(scripted(losses), every=1, criterion="eval/loss", higher=False, save_best=True)
    saves = run_loop(tmp_path, 5, evaluator, eval_steps=1, save_best="loss")
    assert [s for s, _ in saves] == [1, 2, 4, 5]  # the improvements, and the end
    assert [p["eval"]["eval/loss"] for _, p in saves] == [3.0, 1.0, 0.5, 4.0]
    assert all(p["best_by"] == {"name": "eval/loss", "higher_is_better": False} for _, p in saves)
    assert [e["step"] for e in saves[-1][1]["summary"]["eval_history"]] == [1, 2, 3, 4, 5]

    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["eval_loss"] == 4.0 and [e["eval/loss"] for e in summary["eval_history"]] == losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "lora"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == list(zip(range(1, 6), losses, strict=True))


def test_without_save_best_the_loop_evaluates_at_eval_steps_and_checkpoints_only(tmp_path, fake_dist):  # noqa: F811
    evaluator = Evaluator(scripted([3.0, 1.0, 2.0, 0.7]), every=2, criterion="eval/loss", higher=False,
                          save_best=False)
    saves = run_loop(tmp_path, 6, evaluator, eval_steps=2, save_steps=3)
    # every checkpoint is evaluated (3), so its meta.json records its own weights' values; improvements alone (2)
    # are not saved without --save_best
    assert [(s, p["eval"]["eval/loss"]) for s, p in saves] == [(3, 1.0), (6, 0.7)]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert [e["step"] for e in summary["eval_history"]] == [2, 3, 4, 6]


def write_checkpoint(out: Path, step: int, loss: float, value: float, by: dict | None) -> None:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    meta = {"step": step, "loss": loss, **({"eval": {by["name"]: value}, "best_by": by} if by else {})}
    checkpoint.write_meta(ckpt, meta)


@pytest.mark.parametrize("by,values,best", [
    ({"name": "eval/loss", "higher_is_better": False}, [1.0, 3.0, 2.0, 2.5], 1),
    ({"name": "eval/rouge-l", "higher_is_better": True}, [10.0, 5.0, 30.0, 20.0], 3),
    (None, [0, 0, 0, 0], 2),  # no evaluation: the lowest training loss, as before
])
def test_save_total_limit_keeps_the_best_eval_checkpoint(tmp_path, by, values, best):
    for step, (loss, value) in enumerate(zip([5.0, 1.0, 4.0, 3.0], values, strict=True), start=1):
        write_checkpoint(tmp_path, step, loss, value, by)
    removed = rundir.prune(tmp_path, 1, {tmp_path / "checkpoint-4"})
    kept = sorted(p.name for p in checkpoint.checkpoints(tmp_path))
    assert kept == sorted({f"checkpoint-{best}", "checkpoint-4"}), removed
    assert rundir.best_record(tmp_path)["best_checkpoint"]["step"] == best


def test_eval_options_need_an_eval_file_and_a_metric_needs_samples():
    with pytest.raises(ValueError, match="--eval_steps.*--eval_path"):
        TrainArgs(eval_steps=5)
    with pytest.raises(ValueError, match="--save_best metric needs --eval_metric_samples"):
        TrainArgs(eval_path="data/sample_test.jsonl", save_best="metric")
    with pytest.raises(ValueError, match="--save_best must be loss or metric"):
        TrainArgs(eval_path="data/sample_test.jsonl", save_best="best")


# ------------------------------------------------------------------- one real run, DeepSpeed in this process



def test_a_run_logs_eval_loss_and_metric_and_keeps_the_best(group, tmp_path):
    lines = (ROOT / "data" / "sample_test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(lines[:5]), encoding="utf-8")
    out = tmp_path / "out"
    train = TrainArgs(output_dir=str(out), model_dir="tiny", max_len=128, max_src_len=64, max_steps=4, log_steps=1,
                      learning_rate=5e-2, eval_path=str(eval_path), eval_steps=2, eval_batch_size=2,
                      eval_metric_samples=2, save_best="metric", save_steps=2, save_total_limit=1, task="generation")
    final = train_module.run(train, lora.Args(lora_r=4), lora)

    summary = json.loads((out / "train_summary.json").read_text())
    assert [e["step"] for e in summary["eval_history"]] == [2, 4]
    assert {"eval/loss", "eval/rouge-l"} <= summary["eval"].keys()
    best = summary["best_checkpoint"]
    assert best["by"] == "eval/rouge-l"
    # --save_total_limit 1 keeps the newest and the best by the metric (training loss may prefer another)
    assert {c.name for c in checkpoint.checkpoints(out)} == {f"checkpoint-{best['step']}", "checkpoint-4"}
    meta = checkpoint.read_meta(final)
    assert meta["eval"] == {k: v for k, v in summary["eval"].items() if k != "step"}
    assert meta["best_by"] == {"name": "eval/rouge-l", "higher_is_better": True}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs" / "lora"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("eval/rouge-l")] == [2, 4]

    # the logged value is the eval loss of the saved weights, computed directly
    model, _ = train_module.prepare_model(train, lora.Args(lora_r=4), lora, torch.float32)
    checkpoint.load_weights(model, final, lora)
    examples = read_data(str(eval_path), load_tokenizer("tiny"), train).examples
    assert summary["eval_loss"] == pytest.approx(direct_eval_loss(model.eval(), examples), rel=1e-6)


def test_evaluation_restores_train_mode_and_its_best_survives_a_resume():
    evaluator = Evaluator(scripted([2.0]), every=0, criterion="eval/loss", higher=False, save_best=True,
                          history=[{"step": 2, "eval/loss": 1.0}, {"step": 4, "eval/loss": 1.5}])
    assert evaluator.best == 1.0 and not evaluator.save_now()
    evaluator()
    assert not evaluator.save_now(), "2.0 is no improvement on the earlier segment's 1.0"

    class Module(torch.nn.Module):
        def forward(self, input_ids, labels, attention_mask, logits_to_keep):
            assert not self.training
            return type("Out", (), {"loss": torch.tensor(1.0)})()

    module = Module().train()
    engine = type("E", (), {"module": module, "device": torch.device("cpu"),
                            "zero_optimization_stage": lambda self: 0})()
    train = TrainArgs(eval_path="data/sample_test.jsonl", max_len=128, max_src_len=64)
    data = read_data(train.eval_path, load_tokenizer("tiny"), train)
    measured = evaluate.build(engine, train, (data, data), load_tokenizer("tiny"), None)()
    assert measured == {"eval/loss": 1.0} and module.training
