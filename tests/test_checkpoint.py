"""The output directory and the checkpoint files, without a process group: the lock, the guard against mixing runs,
--resume's settings check, staging and atomic replacement, --save_total_limit, RNG states, damaged files, full disks.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from glmft import checkpoint, rundir, snapshot
from glmft.args import TrainArgs
from glmft.train import meta_record, run_identity
from glmft.tuners import lora, pt


def fake_checkpoint(directory, step: int, loss: float | None = None):
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / checkpoint.META_FILE).write_text(json.dumps({"step": step, "loss": loss}))
    return path


# ------------------------------------------------------------------------------------------------- 12: the lock


def test_lock_names_host_and_pid_and_goes_away_even_on_an_exception(tmp_path):
    with pytest.raises(KeyError), rundir.lock(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        raise KeyError("the run failed")
    assert not (tmp_path / rundir.LOCK_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_second_writer_is_refused_naming_host_pid_and_file(tmp_path):
    with rundir.lock(tmp_path) as path:
        with pytest.raises(rundir.OutputDirError) as err, rundir.lock(tmp_path):
            pass
        message = str(err.value)
        assert str(path) in message and socket.gethostname() in message and f"pid {os.getpid()}" in message
        assert path.exists(), "the refused writer must not remove the holder's lock"
    other = {"host": "gpu-node-7", "pid": 1, "started": "yesterday"}  # elsewhere: it cannot be checked, so it holds
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(rundir.OutputDirError, match="gpu-node-7 pid 1"), rundir.lock(tmp_path):
        pass


def test_a_dead_processs_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    glmft_log = logging.getLogger("glmft")
    glmft_log.addHandler(caplog.handler)  # the training log does not propagate to the root logger caplog watches
    try:
        with caplog.at_level(logging.WARNING, logger="glmft"), rundir.lock(tmp_path) as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        glmft_log.removeHandler(caplog.handler)
    assert f"pid {gone.pid}" in caplog.text and "taking it over" in caplog.text


# ------------------------------------------------------------------------------- 4: fresh runs and --resume checks


def test_fresh_run_refuses_another_runs_results_unless_told_to_overwrite(tmp_path):
    board = tmp_path / "runs" / "lora"
    fake_checkpoint(tmp_path, 4)
    (tmp_path / "train_summary.json").write_text("{}")
    board.mkdir(parents=True)
    (board / "events.out.tfevents.1").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(rundir.OutputDirError, match="checkpoint-4, train_summary.json.*--overwrite_output_dir"):
        rundir.prepare(tmp_path, board, resume=False, overwrite=False)
    assert (tmp_path / "checkpoint-4").exists()
    rundir.prepare(tmp_path, board, resume=True, overwrite=False)  # continuing it is fine
    rundir.prepare(tmp_path, board, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "runs"], "only that run's results go"


def test_resume_refuses_a_checkpoint_written_with_other_settings(tmp_path):
    train = TrainArgs(output_dir=str(tmp_path), learning_rate=0.05, max_len=128, max_src_len=64)
    args = lora.Args(lora_r=8)
    ckpt = fake_checkpoint(tmp_path, 6)
    checkpoint.write_meta(ckpt, meta_record(train, args, lora, {}, 6, 0, world=2, zero_stage=3))
    assert rundir.check_resume(tmp_path, run_identity(train, args, lora, world=2, zero_stage=3)) == ckpt
    other = TrainArgs(output_dir=str(tmp_path), learning_rate=0.01, max_len=128, max_src_len=64, max_steps=9)
    with pytest.raises(rundir.OutputDirError) as err:
        rundir.check_resume(tmp_path, run_identity(other, lora.Args(lora_r=4), lora, world=1, zero_stage=3))
    message = str(err.value)
    for named in ("--lora_r: 8 in the checkpoint, 4 now", "--learning_rate: 0.05 in the checkpoint, 0.01 now",
                  "--max_steps: 0", "world size", str(ckpt / "meta.json")):
        assert named in message, message
    assert "zero" not in message.lower()
    with pytest.raises(rundir.OutputDirError, match="method: 'lora' in the checkpoint, 'pt' now"):
        rundir.check_resume(tmp_path, run_identity(train, pt.Args(), pt, world=2, zero_stage=3))


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValueError, match="use one"):
        TrainArgs(resume=True, overwrite_output_dir=True)


# ---------------------------------------------------------------------------- 9: staging and atomic replacement


def test_same_step_replacement_never_loses_the_old_checkpoint(tmp_path, monkeypatch):
    old = fake_checkpoint(tmp_path, 2, loss=1.0)
    staging = checkpoint.staging_dir(tmp_path, 2)
    staging.mkdir()
    (staging / checkpoint.META_FILE).write_text(json.dumps({"step": 2, "loss": 0.5}))
    real_replace = os.replace

    def failing(src, dst):
        if str(src) == str(staging):
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="I/O error"):
        checkpoint.publish(staging)
    assert checkpoint.read_meta(old)["loss"] == 1.0, "the old checkpoint was deleted before the new one was in place"
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint.publish(staging) == old and checkpoint.read_meta(old)["loss"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_recover_repairs_what_a_crash_left(tmp_path):
    stale = checkpoint.stage(checkpoint.staging_dir(tmp_path, 8))
    (stale / "rng_rank7.pt").write_text("another world size")
    aside = fake_checkpoint(tmp_path, 4).rename(tmp_path / ".checkpoint-4.old")  # crashed between the two renames
    fake_checkpoint(tmp_path, 6).rename(tmp_path / ".checkpoint-6.deleting")  # crashed while pruning
    checkpoint.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"] and not aside.exists()


def test_stage_clears_a_killed_runs_leftovers(tmp_path):
    staging = checkpoint.staging_dir(tmp_path, 3)
    (staging / "engine").mkdir(parents=True)
    (staging / "engine" / "rng_rank7.pt").write_text("from a 8-rank run")
    assert list(checkpoint.stage(staging).iterdir()) == []


# ----------------------------------------------------------------------------------------- 13: --save_total_limit


def test_save_total_limit_keeps_the_newest_the_best_and_the_resumed_one(tmp_path):
    paths = {step: fake_checkpoint(tmp_path, step, loss) for step, loss in
             [(2, 3.0), (4, 1.0), (6, 2.0), (8, 2.5), (10, 2.2), (12, None)]}
    removed = rundir.prune(tmp_path, 2, keep={paths[6]})
    assert sorted(removed) == sorted([paths[2], paths[8]])
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6", "checkpoint-10",
                                                                  "checkpoint-12"]
    assert rundir.prune(tmp_path, 0, keep=set()) == []


def test_size_text_splits_weights_and_engine_state(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "state.pt").write_bytes(b"x" * 2_500_000)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 16_400)
    assert rundir.size_text(tmp_path) == "2.5 MB (weights and meta 16.4 kB, engine state 2.5 MB)"


# ------------------------------------------------------------------------------------------- 3: CUDA RNG states


def test_rng_state_holds_and_restores_this_ranks_cuda_generator(tmp_path, monkeypatch):
    fake = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    torch.save(snapshot.rng_state(), tmp_path / "rng_rank0.pt")
    state = torch.load(tmp_path / "rng_rank0.pt", weights_only=False)
    assert torch.equal(state["cuda"], fake)
    snapshot.restore_rng(state, tmp_path / "rng_rank0.pt")
    assert len(restored) == 1 and torch.equal(restored[0], fake)


# --------------------------------------------------------------------- 16: damaged files and full disks named


@pytest.mark.parametrize("tuner", [pt, lora])
def test_a_truncated_weights_file_is_named(tmp_path, tuner):
    args = tuner.Args(pre_seq_len=4) if tuner is pt else tuner.Args()
    model = tuner.apply(tiny_model(**tuner.model_overrides(args)) if tuner is pt else tiny_model(), args)
    checkpoint.save(model, tmp_path / "ckpt", {"method": tuner.NAME}, tuner)
    path = tmp_path / "ckpt" / ("adapter_model.safetensors" if tuner is lora else checkpoint.WEIGHTS_FILE)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{path}: cannot read its tensors.*truncated"):
        checkpoint.load_weights(model, tmp_path / "ckpt", tuner)


def test_a_full_disk_names_the_device_and_the_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    args = pt.Args(pre_seq_len=4)
    model = pt.apply(tiny_model(**pt.model_overrides(args)), args)
    with pytest.raises(OSError) as err:
        checkpoint.save(model, tmp_path / "ckpt", {"method": "pt"}, pt)
    assert err.value.errno == errno.ENOSPC
    staged = tmp_path / ".ckpt.partial" / checkpoint.WEIGHTS_FILE
    assert f"no space left on {checkpoint.device_of(tmp_path)} while writing {staged}" in str(err.value)
    assert "mounted at" in str(err.value)


def test_torch_saves_iostream_error_on_a_full_disk_is_named_too(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 0)
    target = tmp_path / "rng_rank0.pt"
    with pytest.raises(OSError, match=f"no space left on .* while writing {target}"), checkpoint.writing(target):
        raise RuntimeError("basic_ios::clear: iostream error")
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10**12)
    with pytest.raises(RuntimeError, match="iostream"), checkpoint.writing(target):  # not a full disk: as it was
        raise RuntimeError("basic_ios::clear: iostream error")
