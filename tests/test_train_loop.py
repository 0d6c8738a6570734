"""The training loop with a stand-in DeepSpeed engine (no model, no process group): where the tensors handed to
collectives live, how often the host reads the device, when a diverging run stops; the optimizer's weight-decay
groups; a resumed run's TensorBoard log and summary.

The stand-in engine can live on the ``meta`` device: a CPU-only machine then sees what NCCL would refuse (a CPU tensor
in a collective), and every host read of a device value goes through a counted stand-in (on meta it has no value).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import chatglm
from glmft import optim
from glmft.args import TrainArgs
from glmft.health import BadSteps, NonFiniteLoss
from glmft.monitor import Monitor
from glmft.train import loop
from glmft.tuners import TUNERS

BATCH = 2  # records per micro-batch
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter")
HOST_READS = ("tolist", "item", "__bool__", "__float__", "__int__")

ROOT = Path(__file__).resolve().parents[1]


class Engine:
    """What the loop uses of a DeepSpeed engine: a constant (or scripted) loss, accumulation, skipped steps."""

    def __init__(self, device: str, accumulation: int, loss=lambda micro: 2.0, skipped=lambda step: False,
                 norm=lambda step, device: 1.0):
        self.device = torch.device(device)
        self.accumulation, self.loss, self.skipped, self.norm = accumulation, loss, skipped, norm
        self.micro_steps = self.global_steps = self.skipped_steps = 0
        self.applied: list[int] = []  # optimizer steps whose update reached the weights

    def __call__(self, input_ids, labels, attention_mask, **loss_kwargs):
        assert input_ids.device == self.device
        return SimpleNamespace(loss=torch.full((), self.loss(self.micro_steps), device=self.device))

    def backward(self, loss):
        pass

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation == 0

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.global_steps += 1
            if self.skipped(self.global_steps):
                self.skipped_steps += 1
            else:
                self.applied.append(self.global_steps)
        self.micro_steps += 1

    def get_global_grad_norm(self):
        return math.inf if self.skipped(self.global_steps) else self.norm(self.global_steps, self.device)

    def get_lr(self):
        return [0.1]


class Sampler(list):
    def set_epoch(self, epoch):
        pass


def run_loop(tmp_path, engine, steps: int, saves: list, world: int = 1, **options):
    micro = steps * engine.accumulation
    batch = {"input_ids": torch.ones(BATCH, 8, dtype=torch.long), "labels": torch.ones(BATCH, 8, dtype=torch.long),
             "attention_mask": torch.ones(BATCH, 8, dtype=torch.long)}
    dataset = SimpleNamespace(records=[SimpleNamespace(line=i + 1) for i in range(micro * BATCH)])
    train = TrainArgs(output_dir=str(tmp_path), max_steps=steps, learning_rate=0.1,
                      gradient_accumulation_steps=engine.accumulation, train_batch_size=BATCH, **options)
    info = {"method": "lora"}
    loop(engine, [batch] * micro, Sampler(range(micro * BATCH)), dataset, train, steps,
         {"step": 0, "epoch": 0, "batch": 0}, save=lambda step, position: saves.append((step, position)), info=info)


@pytest.fixture
def fake_dist(monkeypatch):
    """One rank; every collective records the devices of the tensors it is handed (and does nothing)."""
    handed: list[tuple[str, torch.device]] = []

    def recorder(name):
        def collective(*args, **kwargs):
            for arg in [*args, *kwargs.values()]:
                for t in arg if isinstance(arg, (list, tuple)) else [arg]:
                    if torch.is_tensor(t):
                        handed.append((name, t.device))
        return collective

    for name in COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, recorder(name))
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    return handed


@pytest.fixture
def host_reads(monkeypatch):
    """Count every read of a meta tensor's value on the host (which has none: it reads as zeros / False)."""
    reads: list[str] = []

    def stand_in(name):
        original = getattr(torch.Tensor, name)

        def read(self):
            if self.device.type != "meta":
                return original(self)
            reads.append(name)
            return torch.zeros(self.shape).tolist() if name == "tolist" else type(original(torch.zeros(())))(0)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, stand_in(name))
    return reads


def test_collectives_get_engine_device_tensors_and_the_host_reads_once_per_optimizer_step(
        tmp_path, fake_dist, host_reads):
    steps, accumulation, log_steps, save_steps = 6, 4, 3, 3
    engine = Engine("meta", accumulation, norm=lambda step, device: torch.ones((), device=device))  # ZeRO: a tensor
    saves = []
    run_loop(tmp_path, engine, steps, saves, log_steps=log_steps, save_steps=save_steps)
    assert [s for s, _ in saves] == [3, 6]
    assert fake_dist, "the loop hands nothing to a collective: the test sees nothing"
    off = sorted({(name, str(device)) for name, device in fake_dist if device != engine.device})
    assert not off, f"collectives got tensors off the engine's device ({engine.device}): {off}"
    logs, n_saves = steps // log_steps, len(saves)
    # per optimizer step: the divergence check; per log step: the window; per save: totals and the pending grad-norm
    # flag; at the end: totals. Nothing per micro-batch (there are steps * accumulation = 24 of them).
    assert len(host_reads) <= steps + logs + 2 * n_saves + 1, host_reads
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [3, 6]


def test_a_nonfinite_loss_on_any_rank_stops_before_its_step_is_applied(tmp_path, fake_dist, monkeypatch):
    """Micro-batch 5 (records 11 and 12, lines 11-12) is NaN on this rank; rank 1's step 2 is NaN (simulated in
    the collective). Accumulation 2, a save every step: step 1 is saved, step 2 stops everyone, unapplied."""
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)

    def all_reduce(tensor, *args, **kwargs):
        if tensor.shape == (2, 3) and engine.global_steps == 1:
            tensor[1, 0] = 1.0  # the other rank's first micro-batch of step 2
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    engine = Engine("cpu", 2, loss=lambda micro: math.nan if micro == 5 else 2.0)
    saves = []
    with pytest.raises(NonFiniteLoss, match=r"non-finite on rank\(s\) \[1\]\) at step 2") as err:
        run_loop(tmp_path, engine, 4, saves, log_steps=1, save_steps=1)
    assert "lower --learning_rate" in str(err.value) and "Nothing was saved" in str(err.value)
    assert engine.applied == [1] and [s for s, _ in saves] == [1]

    engine = Engine("cpu", 2, loss=lambda micro: math.nan if micro == 5 else 2.0)  # now this rank alone
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: None)
    saves = []
    with pytest.raises(NonFiniteLoss, match=r"loss is \[nan\] on rank 0 .* at step 3 .*lines \[11, 12\] of ") as err:
        run_loop(tmp_path, engine, 4, saves, log_steps=1, save_steps=1)
    assert engine.applied == [1, 2] and [s for s, _ in saves] == [1, 2]


@pytest.mark.parametrize("first_bad, stops_at", [(4, 9), (101, 110), (None, None)])
def test_too_many_skipped_steps_stop_the_run_and_nothing_diverged_is_saved(tmp_path, fake_dist, first_bad, stops_at):
    """Skipped from step 4 on: a quarter of 20 is passed at step 9. After 100 good steps: ten in a row stop it at
    110. fp16's loss-scale search (steps 1-5 skipped, then fine) must pass."""
    steps = 130

    def skipped(step):
        return step <= 5 if first_bad is None else step >= first_bad

    engine, saves = Engine("cpu", 1, skipped=skipped), []
    if stops_at is None:
        run_loop(tmp_path, engine, steps, saves, log_steps=50, save_steps=10)
        summary = json.loads((tmp_path / "train_summary.json").read_text())
        assert summary["skipped_steps"] == 5 and summary["nonfinite_grad_norm_steps"] == 5
        return
    with pytest.raises(BadSteps, match=f"of {stops_at} optimizer steps had non-finite gradients") as err:
        run_loop(tmp_path, engine, steps, saves, log_steps=50, save_steps=1)
    assert "lower --learning_rate" in str(err.value)
    assert saves[-1][0] == stops_at - 1 and engine.global_steps == stops_at


def test_a_step_applied_with_a_nonfinite_grad_norm_is_never_saved(tmp_path, fake_dist):
    """bf16 without overflow checks applies such a step; the norm is a device tensor, read before the save."""
    engine = Engine("cpu", 2, norm=lambda step, device: torch.tensor(math.nan if step == 3 else 1.0, device=device))
    saves = []
    with pytest.raises(BadSteps, match="optimizer step 3 was applied with a non-finite gradient norm"):
        run_loop(tmp_path, engine, 3, saves, log_steps=10, save_steps=0)
    assert not saves


def test_a_training_forward_does_not_read_its_attention_mask_on_the_host(monkeypatch):
    """The loop always passes the padding mask; testing it for all-ones cost a device sync per micro-batch."""
    from conftest import prompt, tiny_model

    model = tiny_model().train()
    ids = torch.tensor([prompt([5, 6, 7], [8, 9], eop=True)] * 2)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 4, -100)
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    without = model(input_ids=ids, labels=labels).loss
    baseline = len(reads)
    with_mask = model(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids)).loss
    assert len(reads) - baseline == baseline, reads[baseline:]
    torch.testing.assert_close(with_mask, without, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ weight-decay groups

CASES = {"freeze": dict(num_trainable_layers=1), "embedding": {}, "pt": dict(pre_seq_len=3, prefix_projection=True),
         "lora": dict(lora_r=4)}


def groups_of(method: str) -> list[set[str]]:
    tuner = TUNERS[method]
    args = tuner.Args(**CASES[method])
    overrides = tuner.model_overrides(args)
    model = tuner.apply(chatglm.ChatGLMForConditionalGeneration.from_pretrained(chatglm.TINY_DIR, **overrides), args)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optim.param_groups(model, 0.1)
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    return [by_decay.get(0.1, set()), by_decay.get(0.0, set())]


@pytest.mark.parametrize("method", CASES)
def test_weight_decay_spares_biases_norms_embeddings_and_the_prefix(method):
    decay, no_decay = groups_of(method)
    if method == "freeze":
        layer = "transformer.layers.1."
        assert decay == {layer + m for m in ("attention.query_key_value.weight", "attention.dense.weight",
                                             "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")}
        assert no_decay and all(n.endswith(".bias") or "layernorm" in n for n in no_decay), no_decay
    elif method == "embedding":
        assert not decay and no_decay == {"transformer.word_embeddings.weight"}
    elif method == "pt":  # the projection's matrices too: they exist only to make the prefix
        assert not decay and no_decay and all(".prefix_encoder." in f".{n}" for n in no_decay)
        assert "transformer.prefix_encoder.trans.0.weight" in no_decay
    else:
        assert not no_decay and decay and all(".lora_A." in n or ".lora_B." in n for n in decay)


def test_run_header_names_both_groups():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    text = optim.describe(optim.param_groups(model, 0.1), 0.1)
    assert text == "decay 0.1: 1 tensors / 16 values, no decay: 4 tensors / 52 values"


# ----------------------------------------------------------------------------------------------- resumed runs


def test_a_resumed_run_continues_its_log_and_summary(tmp_path):
    """Segment 1 logs steps 1-5 and is killed after its checkpoint at step 3; segment 2 resumes from it and logs
    4-6. TensorBoard must show each step once (segment 2's 4 and 5), the summary the whole run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def point(step, loss):
        return {"train/loss": loss, "train/lr": 0.1, "train/grad_norm": 1.0, "train/tokens_per_s": 1.0,
                "train/peak_mem_gb": 0.5}

    first = Monitor(0, tmp_path / "runs", 6, 0)
    checkpointed = None
    for step in range(1, 6):
        first.step(step, point(step, 10.0 + step))
        if step == 3:
            checkpointed = first.snapshot(samples=30, tokens=300)
    first.close()  # (a killed run leaves what it had flushed)
    # A resumed run is a later process, so its event file sorts after the first's by its timestamp (whole seconds).
    # In one process within one second the names differ only by a counter ("...9" sorts after "...10" in a long
    # test session), which would make the reader meet the purge before the points it purges.
    time.sleep(1.05 - time.time() % 1)
    second = Monitor(0, tmp_path / "runs", 6, 3, checkpointed)
    for step in range(4, 7):
        second.step(step, point(step, float(step)))
    second.close(tmp_path / "summary.json", {"steps": 6}, samples=30, tokens=300)

    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 4.0), (5, 5.0), (6, 6.0)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert summary["samples"] == 60 and summary["tokens"] == 600
    assert summary["wall_seconds"] >= checkpointed["wall_seconds"]
    assert summary["history"][3]["wall_s"] >= checkpointed["wall_seconds"]


def test_a_plain_run_handed_a_taken_port_tries_another():
    """Two plain ``python finetuning_x.py`` runs started together can be handed the same free port (it is released
    before the rendezvous binds it): the one that finds it taken must take another, not fail with EADDRINUSE."""
    script = """
import itertools, os, socket
import glmft.train as t
taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
busy = taken.getsockname()[1]
ports = itertools.chain([busy], iter(t._free_port, None))
t._free_port = lambda: next(ports)
print(t.init_distributed(), busy != int(os.environ["MASTER_PORT"]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(0, 1) True"
