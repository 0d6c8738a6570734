"""ZeRO-2/3: checkpoints gathered whole and identical in format to ZeRO-1's, lean engine state, and (slow) every
method through ``deepspeed --num_gpus 2`` on the CPU under ZeRO-1, 2, 3 and 3 with offload, resumed under 2 and 3.

The first part runs DeepSpeed engines in this process on a one-rank gloo group (ZeRO-3 partitions even then: each
parameter's own tensor is empty outside a gather). ZeRO-3 leaves tensors below ``stage3_param_persistence_threshold``
(1e5 values by default) whole on every rank, and every tensor of the tiny model is that small, so the tests set the
threshold to 0: everything is partitioned, as the real model's matrices are.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import deepspeed
import pytest
import torch
from test_scripts import SMALL, Pool, deepspeed_launcher, four_records, free_port, trained_weights

from glmft import checkpoint, rundir
from glmft import train as train_module
from glmft.args import TrainArgs
from glmft.data import SupervisedDataset, collate
from glmft.model import build_model, count_parameters, load_tokenizer
from glmft.predict import PredictArgs
from glmft.predict import run as predict
from glmft.train import meta_record, save_checkpoint
from glmft.tuners import adapter, bitfit, freeze, ia3, lora, pt

ROOT = Path(__file__).resolve().parents[1]
TUNED = {"lora": (lora, lora.Args(lora_r=4)), "pt": (pt, pt.Args(pre_seq_len=4, prefix_projection=True)),
         "freeze": (freeze, freeze.Args(num_trainable_layers=1)), "bitfit": (bitfit, bitfit.Args()),
         "ia3": (ia3, ia3.Args()), "adapter": (adapter, adapter.Args(adapter_size=8))}
TUNED.update(lora_int4=TUNED["lora"], freeze_int8=TUNED["freeze"])  # on a base quantized while loading


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer("tiny")
    data = SupervisedDataset(ROOT / "data" / "sample_train.jsonl", tokenizer, 128, 64)
    return collate([data[0], data[1]], tokenizer.pad_token_id)


def make_engine(stage: int, method: str):
    tuner, args = TUNED[method]
    torch.manual_seed(0)  # the same new parameters (LoRA A, the prefix) for every stage
    overrides = tuner.model_overrides(args)
    if "_int" in method:
        overrides["quantization_bit"] = int(method[-1])
    model = tuner.apply(build_model("tiny", torch.float32, overrides), args)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    return engine, tuner, args, overrides


def train_and_save(engine, tuner, args, overrides, batch, output_dir: Path, step: int = 1) -> Path:
    engine.train()
    engine.backward(engine(**batch).loss)
    engine.step()
    save_checkpoint(engine, TrainArgs(output_dir=str(output_dir)), args, tuner, overrides, step,
                    {"step": step, "epoch": 0, "batch": step})
    return output_dir / f"checkpoint-{step}"


# ------------------------------------------------------------------------------- in this process, one rank


@pytest.mark.parametrize("method", ["lora", "pt", "lora_int4", "freeze_int8", "bitfit", "ia3", "adapter"])
def test_zero3_checkpoint_is_whole_and_the_same_as_zero1s(group, batch, tmp_path, method):
    """Also on INT4/INT8 bases: ZeRO-3 partitions the int8 tensors of our quantized layers and gathers them for the
    custom matmul (forward and backward) like any other parameter, so that combination needs no refusal."""
    saved, files = {}, {}
    for stage in (1, 3):
        engine, *rest = make_engine(stage, method)
        if stage == 3:
            assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 did not partition"
        ckpt = train_and_save(engine, *rest, batch, tmp_path / f"zero{stage}")
        saved[stage], files[stage] = trained_weights(ckpt), sorted(p.name for p in ckpt.iterdir())
    assert files[3] == files[1] and {"meta.json", "engine"} <= set(files[1])
    assert saved[3].keys() == saved[1].keys() and saved[1]
    for name, tensor in saved[1].items():
        assert saved[3][name].shape == tensor.shape and saved[3][name].dtype == tensor.dtype, name
        torch.testing.assert_close(saved[3][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_parameter_counts_see_through_zero3(group):
    engine, tuner, args, overrides = make_engine(3, "freeze")
    plain = tuner.apply(build_model("tiny", torch.float32, overrides), args)
    assert count_parameters(engine.module) == count_parameters(plain)
    assert count_parameters(plain)[0] > 0


def module_state(engine_dir: Path) -> dict:
    return torch.load(next(engine_dir.rglob("*model_states.pt")), weights_only=False)["module"]


def test_engine_state_holds_the_trainable_tensors_only(group, batch, tmp_path):
    """DeepSpeed's exclude_frozen_parameters alone keeps the tied output layer (lm_head.weight, frozen): on the tiny
    model's LoRA run that is 376,037 bytes of model state instead of 15,321."""
    engine, tuner, args, overrides = make_engine(1, "lora")
    engine.save_checkpoint(str(tmp_path / "deepspeed_alone"), tag="state", exclude_frozen_parameters=True)
    ckpt = train_and_save(engine, tuner, args, overrides, batch, tmp_path / "out")
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert set(module_state(ckpt / "engine")) == trainable
    before = sum(f.stat().st_size for f in (tmp_path / "deepspeed_alone").rglob("*model_states.pt"))
    after = sum(f.stat().st_size for f in (ckpt / "engine").rglob("*model_states.pt"))
    assert after < before / 10, (before, after)


def test_a_killed_runs_staging_directory_is_not_published(group, batch, tmp_path):
    leftover = checkpoint.staging_dir(tmp_path, 1) / "engine"
    leftover.mkdir(parents=True)
    (leftover / "rng_rank7.pt").write_text("from a killed 8-rank run")
    ckpt = train_and_save(*make_engine(1, "pt"), batch, tmp_path)
    assert not (ckpt / "engine" / "rng_rank7.pt").exists()
    assert (ckpt / "engine" / "rng_rank0.pt").is_file()


def test_run_refuses_before_building_the_model(group, tmp_path, monkeypatch):
    """A fresh run into another run's results, and a --resume whose checkpoint was written by two ranks at another
    learning rate, stop before any model is built, naming what differs and what to do."""
    monkeypatch.setattr(train_module, "prepare_model", lambda *a, **k: pytest.fail("built the model"))
    options = dict(output_dir=str(tmp_path), max_len=128, max_src_len=64, learning_rate=5e-2, max_steps=4)
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    checkpoint.write_meta(ckpt, meta_record(TrainArgs(**options), lora.Args(), lora, {}, 2, 0, world=2))
    with pytest.raises(rundir.OutputDirError, match="holds another run's results.*--overwrite_output_dir"):
        train_module.run(TrainArgs(**options), lora.Args(), lora)
    with pytest.raises(rundir.OutputDirError) as err:
        train_module.run(TrainArgs(**{**options, "learning_rate": 1e-3}, resume=True), lora.Args(), lora)
    assert "--learning_rate: 0.05 in the checkpoint, 0.001 now" in str(err.value)
    assert "world size (number of ranks): 2 in the checkpoint, 1 now" in str(err.value)
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_claim_takes_and_releases_the_lock_and_refuses_a_live_one(group, tmp_path):
    train = TrainArgs(output_dir=str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="boom"), rundir.claim(train, "lora"):
        assert (tmp_path / "out" / rundir.LOCK_FILE).is_file()
        raise RuntimeError("boom")
    assert not (tmp_path / "out" / rundir.LOCK_FILE).exists()
    with rundir.lock(tmp_path / "out"), pytest.raises(rundir.OutputDirError, match="in use by another run"):
        with rundir.claim(train, "lora"):
            pass


# ------------------------------------------------------------- two CPU ranks through the real entry points (slow)

STEPS, EVERY = 4, 2
METHOD_OPTIONS = {"lora": ["--lora_r", "8", "--learning_rate", "5e-2"],
                  "pt": ["--prefix_projection", "--learning_rate", "5e-2"],
                  "freeze": ["--num_trainable_layers", "1", "--learning_rate", "1e-2"]}


def config_files(directory: Path) -> dict[str, Path]:
    """The shipped configs; for the tiny model ZeRO-3 must partition every tensor (threshold 0), and the offload
    run uses torch's AdamW instead of DeepSpeed's CPU Adam, a C++ op whose first build takes minutes."""
    files = {"zero1": ROOT / "ds_config.json", "zero2": ROOT / "ds_zero2.json"}
    for name in ("zero3", "zero3_offload"):
        config = json.loads((ROOT / f"ds_{name}.json").read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        config["optimizer"]["params"]["torch_adam"] = True
        files[name] = directory / f"ds_{name}.json"
        files[name].write_text(json.dumps(config))
    return files


def launch(pool: Pool, name: str, method: str, config: Path, output_dir: Path, *extra: str) -> None:
    pool.start(name, [*deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()),
                      f"finetuning_{method}.py", *SMALL, "--train_path", str(pool.workdir / "four.jsonl"),
                      "--train_batch_size", "1", "--max_steps", str(STEPS), "--save_steps", str(EVERY),
                      "--deepspeed_config", str(config), *METHOD_OPTIONS[method], "--output_dir", str(output_dir),
                      *extra])


class Limited(Pool):
    """At most ``width`` launches at a time, the rest queued: twenty ranks on two cores spend a third of their time
    switching and spinning in gloo."""

    def __init__(self, workdir: Path, width: int = 3):
        super().__init__(workdir)
        self.slots, self.queued, self.closed = threading.Semaphore(width), set(), False

    def start(self, name: str, cmd: list[str]) -> None:
        self.queued.add(name)

        def run() -> None:
            with self.slots:
                if self.closed:
                    return
                Pool.start(self, name, cmd)
                self.queued.discard(name)
                self.procs[name][0].wait()

        threading.Thread(target=run, daemon=True).start()

    def result(self, name: str):
        while name in self.queued:
            time.sleep(0.2)
        return super().result(name)

    def close(self) -> None:
        self.closed = True
        super().close()


RUNS = [(m, s) for m in METHOD_OPTIONS for s in ("zero1", "zero2", "zero3")] + [("lora", "zero3_offload")]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Every run starts at once; each test waits for the ones it checks."""
    work = tmp_path_factory.mktemp("zero")
    four_records(work)
    configs, pool = config_files(work), Limited(work)
    for method, stage in RUNS:
        launch(pool, f"{method}_{stage}", method, configs[stage], work / f"{method}_{stage}")
    yield work, pool, configs
    pool.close()


def finished(grid, name: str) -> Path:
    work, pool, _ = grid
    done = pool.result(name)
    assert done.rc == 0, done.tail()
    assert f"done: {work / name / f'checkpoint-{STEPS}'}, " in done.output and "engine state" in done.output
    return work / name / f"checkpoint-{STEPS}"


@pytest.mark.slow
@pytest.mark.parametrize("method,stage", [r for r in RUNS if r[1] != "zero1"])
def test_every_stage_saves_what_zero1_saves(grid, method, stage):
    reference = trained_weights(finished(grid, f"{method}_zero1"))
    ckpt = finished(grid, f"{method}_{stage}")
    weights = trained_weights(ckpt)
    assert weights.keys() == reference.keys() and weights
    for name, tensor in reference.items():
        assert weights[name].shape == tensor.shape and weights[name].dtype == tensor.dtype, name
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert any(t.abs().max() > 0 for n, t in reference.items() if "lora_A" not in n), "nothing trained"
    meta = checkpoint.read_meta(ckpt)
    assert meta["training"]["world_size"] == 2 and meta["training"]["zero_stage"] == int(stage[4])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_predict_from_zero3_gives_zero1s_tokens(grid, tmp_path, method):
    work = grid[0]
    tuner = TUNED[method][0]
    answers = {}
    for stage in ("zero1", "zero3"):
        args = PredictArgs(ckpt_dir=str(finished(grid, f"{method}_{stage}")), test_path=str(work / "four.jsonl"),
                           output_dir=str(tmp_path / stage), max_new_tokens=12, batch_size=4)
        predict(args, tuner)
        answers[stage] = [json.loads(line)["generated"] for line in (tmp_path / stage / "predictions.jsonl").open()]
    assert answers["zero3"] == answers["zero1"] and len(answers["zero1"]) == 4


@pytest.fixture(scope="module")
def resumed(grid):
    """For ZeRO-2 and ZeRO-3 (both at once): the uninterrupted LoRA run saved at step 2 on its way to 4; a new output
    dir holding only that checkpoint is resumed."""
    work, pool, configs = grid
    for stage in ("zero2", "zero3"):
        final = finished(grid, f"lora_{stage}")
        shutil.copytree(final.parent / f"checkpoint-{EVERY}", work / f"resumed_{stage}" / f"checkpoint-{EVERY}")
        launch(pool, f"resumed_{stage}", "lora", configs[stage], work / f"resumed_{stage}", "--resume")
    return grid


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_under_zero2_and_zero3_ends_like_the_uninterrupted_run(resumed, stage):
    work, pool, _ = resumed
    done = pool.result(f"resumed_{stage}")
    assert done.rc == 0, done.tail()
    assert f"resumed from {work / f'resumed_{stage}' / f'checkpoint-{EVERY}'}" in done.output
    again = trained_weights(work / f"resumed_{stage}" / f"checkpoint-{STEPS}")
    uninterrupted = trained_weights(work / f"lora_{stage}" / f"checkpoint-{STEPS}")
    assert again.keys() == uninterrupted.keys() and again
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-6, msg=name)
