"""Smoke tests of the real entry points, run as subprocesses on the tiny model (``deepspeed finetuning_x.py`` on the
CPU, one and two gloo ranks; plain ``python finetuning_x.py``; ``--dry_run`` on the real configs; bad input).

The launches are independent, so each group starts all of its processes at once (module-scoped pools) and every
test waits only for the run it checks: the file takes about a minute and a half on a 2-core machine instead of
four. The training runs overfit four records at learning rates that make the random tiny model learn within 16 steps
(attention adds little in it, so P-Tuning trains here with its projection MLP; see tests/test_tuners.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "configs"
SMALL = ["--model_dir", "tiny", "--max_len", "128", "--max_src_len", "64", "--log_steps", "1"]
STEPS = 16
TIMEOUT = 420  # seconds for any one launch; far above the ~10-40 s they take
SCALARS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gb")
REPORT = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)")

# method -> (extra options, checks on meta.json["method_args"])
METHODS = {
    "freeze": (["--num_trainable_layers", "1", "--learning_rate", "1e-2"], {"num_trainable_layers": 1}),
    "embedding": (["--learning_rate", "1e-2"], {}),
    "pt": (["--prefix_projection", "--learning_rate", "5e-2"], {"prefix_projection": True, "pre_seq_len": 16}),
    "lora": (["--lora_r", "8", "--learning_rate", "5e-2"], {"lora_r": 8, "lora_dropout": 0.1}),
}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    """The ``deepspeed`` command installed beside this interpreter (the launcher starts ranks with the same one)."""
    beside = Path(sys.executable).parent / "deepspeed"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


@dataclass
class Done:
    rc: int
    output: str

    def tail(self, n: int = 4000) -> str:
        return self.output[-n:]


class Pool:
    """Processes started at once; ``result(name)`` waits for one of them and returns its exit code and output."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.done: dict[str, Done] = {}
        # One thread per process: several runs share two cores; results do not depend on it.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "0"}

    def start(self, name: str, cmd: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.procs[name] = (proc, log)

    def result(self, name: str) -> Done:
        if name not in self.done:
            proc, log = self.procs[name]
            try:
                rc = proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            self.done[name] = Done(rc, log.read_text(errors="replace"))
        return self.done[name]

    def close(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_now(cmd: list[str], workdir: Path, name: str) -> Done:
    pool = Pool(workdir)
    pool.start(name, cmd)
    try:
        return pool.result(name)
    finally:
        pool.close()


def four_records(directory: Path) -> Path:
    """The first four training records: an overfitting set, so the loss falls clearly within a few steps."""
    path = directory / "four.jsonl"
    lines = (ROOT / "data" / "sample_train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:4]), encoding="utf-8")
    return path


def five_records(directory: Path) -> Path:
    """Five test records: on two ranks with eval batches of 2, shards of 3 and 2 (rank 1 runs a filler batch)."""
    path = directory / "five.jsonl"
    lines = (ROOT / "data" / "sample_test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:5]), encoding="utf-8")
    return path


EVAL_2RANKS = ["--eval_steps", "3", "--eval_batch_size", "2", "--eval_path"]


def scalars(output_dir: Path, method: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = output_dir / "runs" / method
    events = sorted(runs.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {runs}"
    acc = EventAccumulator(str(runs))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def checkpoints(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def trained_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    adapter = ckpt / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else ckpt / "trainable.safetensors")


# --------------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every method through ``deepspeed`` (one rank), LoRA on two gloo ranks, and P-Tuning without the launcher."""
    work = tmp_path_factory.mktemp("smoke")
    data = four_records(work)
    pool = Pool(work)
    common = [*SMALL, "--train_path", str(data), "--max_steps", str(STEPS)]
    for method, (extra, _) in METHODS.items():
        pool.start(method, [*deepspeed_launcher(), "--master_port", str(free_port()), f"finetuning_{method}.py",
                            *common, *extra, "--output_dir", str(work / method)])
    pool.start("lora_2ranks", [*deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()),
                               "finetuning_lora.py", *SMALL, "--max_steps", "6", "--train_batch_size", "1",
                               "--output_dir", str(work / "lora_2ranks"), *EVAL_2RANKS, str(five_records(work))])
    pool.start("pt_python", [sys.executable, "finetuning_pt.py", *SMALL, "--max_steps", "4",
                             "--output_dir", str(work / "pt_python")])
    # the case: on the CPU (fp32) DeepSpeed skips every step from the 4th on (inf grad norm), the loss stays
    # finite, and the run used to end "successfully" with an adapter of |B| ~ 3e5
    pool.start("lora_lr1e6", [sys.executable, "finetuning_lora.py", *SMALL, "--max_steps", "30", "--learning_rate",
                              "1e6", "--output_dir", str(work / "lora_lr1e6")])
    yield work, pool
    pool.close()


@pytest.mark.parametrize("method", METHODS)
def test_deepspeed_run_writes_checkpoint_and_learns(smoke, method):
    work, pool = smoke
    done = pool.result(method)
    assert done.rc == 0, done.tail()
    out = work / method

    ckpts = checkpoints(out)
    assert [c.name for c in ckpts] == [f"checkpoint-{STEPS}"], ckpts
    assert not list(out.glob("*.partial")), "a staging directory was left behind"
    ckpt = ckpts[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["method"] == method
    assert meta["base_model"] == "tiny"
    assert meta["step"] == STEPS
    assert {k: meta["method_args"][k] for k in METHODS[method][1]} == METHODS[method][1]
    assert meta["data"]["max_len"] == 128 and meta["data"]["max_src_len"] == 64
    assert meta["dtype"] == "float32"  # the CPU engine trains in fp32 (ds_config.json asks for fp16)
    assert meta["data"]["train_path"].endswith("four.jsonl")

    weights = trained_weights(ckpt)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    if method == "lora":
        assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8
        assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    else:
        prefix = {"freeze": "transformer.layers.1.", "embedding": "transformer.word_embeddings.",
                  "pt": "transformer.prefix_encoder."}[method]
        assert all(k.startswith(prefix) for k in weights), sorted(weights)

    # the optimizer DeepSpeed ran (its saved state) has the weight-decay groups: none for biases, norms, embeddings
    # and the prefix; the run header reports both
    optim_state = torch.load(next((ckpt / "engine").rglob("*optim_states.pt")), weights_only=False)
    decays = [g["weight_decay"] for g in optim_state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]]
    assert decays == {"freeze": [0.1, 0.0], "embedding": [0.0], "pt": [0.0], "lora": [0.1]}[method]
    assert re.search(r"decay 0\.1: \d+ tensors / [\d,]+ values, no decay: \d+ tensors / [\d,]+ values", done.output)
    assert json.loads((out / "train_summary.json").read_text())["skipped_steps"] == 0

    logged = scalars(out, method)
    assert set(SCALARS) <= logged.keys(), sorted(logged)
    loss = logged["train/loss"]
    assert len(loss) == STEPS and all(math.isfinite(x) for x in loss), loss
    first, last = sum(loss[:4]) / 4, sum(loss[-4:]) / 4
    assert last < first - 0.05, f"loss did not fall: {loss}"
    assert max(logged["train/lr"]) > 0 and all(x > 0 for x in logged["train/tokens_per_s"])
    assert all(math.isfinite(x) and x > 0 for x in logged["train/grad_norm"][1:])


def test_skipped_steps_fail_a_diverging_run(smoke):
    work, pool = smoke
    done = pool.result("lora_lr1e6")
    assert done.rc != 0, done.tail()
    assert "BadSteps" in done.output and "optimizer steps had non-finite gradients" in done.output, done.tail()
    assert "DeepSpeed skipped" in done.output and "lower --learning_rate (now 1e+06)" in done.output
    assert not checkpoints(work / "lora_lr1e6")


def test_two_gloo_ranks_save_once(smoke):
    work, pool = smoke
    done = pool.result("lora_2ranks")
    assert done.rc == 0, done.tail()
    assert "world 2" in done.output and "effective batch 2" in done.output
    out = work / "lora_2ranks"
    assert [c.name for c in checkpoints(out)] == ["checkpoint-6"]
    assert len(re.findall(r"INFO saved ", done.output)) == 1, "only rank 0 publishes and logs the checkpoint"
    ckpt = out / "checkpoint-6"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "meta.json").is_file()
    assert {p.name for p in (ckpt / "engine").glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert not list(out.glob("*.partial"))
    assert len(list((out / "runs").rglob("events.out.tfevents.*"))) == 1, "only rank 0 writes TensorBoard"
    loss = scalars(out, "lora")["train/loss"]
    assert len(loss) == 6 and all(math.isfinite(x) for x in loss)
    # DeepSpeed's CPU shm allreduce maps a 66 MiB /dev/shm segment per rank and never unlinks it; each rank removes its
    # own at exit (glmft.train.remove_shm_buffer), so CPU launches leave no RAM behind.
    argv = pool.procs["lora_2ranks"][0].args
    port = argv[argv.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_two_gloo_ranks_share_the_eval_loss(smoke):
    """Each rank evaluates its shard and one all_reduce sums (loss x tokens, tokens): the logged eval loss equals one
    process's over all five records with the saved weights."""
    from glmft import checkpoint, evaluate
    from glmft.args import TrainArgs
    from glmft.model import load_tokenizer
    from glmft.train import prepare_model, read_data
    from glmft.tuners import lora

    work, pool = smoke
    done = pool.result("lora_2ranks")
    assert done.rc == 0, done.tail()
    out = work / "lora_2ranks"
    summary = json.loads((out / "train_summary.json").read_text())
    assert [e["step"] for e in summary["eval_history"]] == [3, 6]
    logged = scalars(out, "lora")["eval/loss"]
    assert logged == pytest.approx([e["eval/loss"] for e in summary["eval_history"]], rel=1e-6)
    ckpt = out / "checkpoint-6"
    train = TrainArgs(model_dir="tiny", max_len=128, max_src_len=64)
    model, _ = prepare_model(train, lora.Args(**checkpoint.read_meta(ckpt)["method_args"]), lora, torch.float32)
    checkpoint.load_weights(model, ckpt, lora)
    tokenizer = load_tokenizer("tiny")
    examples = read_data(str(work / "five.jsonl"), tokenizer, train).examples
    one_rank = evaluate.eval_loss(model.eval(), examples, 5, tokenizer.pad_token_id, torch.device("cpu"))
    assert summary["eval_loss"] == pytest.approx(one_rank, rel=1e-6)  # counting record 0 twice: 1e-4 off


def test_plain_python_without_launcher(smoke):
    work, pool = smoke
    done = pool.result("pt_python")
    assert done.rc == 0, done.tail()
    out = work / "pt_python"
    assert [c.name for c in checkpoints(out)] == ["checkpoint-4"]
    meta = json.loads((out / "checkpoint-4" / "meta.json").read_text())
    assert meta["method"] == "pt" and meta["method_args"]["prefix_projection"] is False
    assert set(trained_weights(out / "checkpoint-4")) == {"transformer.prefix_encoder.embedding.weight"}
    loss = scalars(out, "pt")["train/loss"]
    assert len(loss) == 4 and all(math.isfinite(x) for x in loss)


# ---------------------------------------------------------------------------------------------------------- resume


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    """LoRA with dropout (RNG state) and accumulation 2 over the whole sample file (the data position matters):
    B is killed once its first checkpoint exists, then resumed; it must end where the uninterrupted A ends."""
    steps, every = 10, 2
    args = [*SMALL, "--max_steps", str(steps), "--save_steps", str(every), "--gradient_accumulation_steps", "2",
            "--lora_dropout", "0.1", "--learning_rate", "5e-2"]
    pool = Pool(tmp_path)
    try:
        pool.start("a", [sys.executable, "finetuning_lora.py", *args, "--output_dir", str(tmp_path / "a")])
        pool.start("b", [sys.executable, "finetuning_lora.py", *args, "--output_dir", str(tmp_path / "b")])
        proc_b, _ = pool.procs["b"]
        first = tmp_path / "b" / f"checkpoint-{every}"
        deadline = time.monotonic() + TIMEOUT
        while not (first / "meta.json").is_file() and proc_b.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc_b.poll() is None:
            os.killpg(proc_b.pid, signal.SIGKILL)  # as a crash or a pre-empted job would stop it
        b_first = pool.result("b")
        assert (first / "meta.json").is_file(), b_first.tail()
        for ckpt in checkpoints(tmp_path / "b"):  # if B finished before the kill, keep only the first checkpoint
            if int(ckpt.name.split("-")[1]) > every and b_first.rc == 0:
                shutil.rmtree(ckpt)
        survivor = checkpoints(tmp_path / "b")[-1]
        assert int(survivor.name.split("-")[1]) < steps
        pool.start("b_resumed", [sys.executable, "finetuning_lora.py", *args, "--output_dir", str(tmp_path / "b"),
                                 "--resume"])
        a, b = pool.result("a"), pool.result("b_resumed")
    finally:
        pool.close()
    assert a.rc == 0, a.tail()
    assert b.rc == 0, b.tail()
    assert f"resumed from {survivor}" in b.output, b.tail()
    final_a, final_b = (trained_weights(tmp_path / x / f"checkpoint-{steps}") for x in "ab")
    assert final_a.keys() == final_b.keys() and final_a
    assert any(t.abs().max() > 0 for n, t in final_a.items() if ".lora_B." in n), "LoRA B starts at 0: nothing trained"
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=0, atol=1e-6, msg=name)
    assert not list((tmp_path / "b").glob("checkpoint-*.partial"))
    # the summary and TensorBoard cover the whole run once: each log step once, the same totals as A's
    summary_a, summary_b = (json.loads((tmp_path / x / "train_summary.json").read_text()) for x in "ab")
    assert [h["step"] for h in summary_b["history"]] == list(range(1, steps + 1))
    assert (summary_b["samples"], summary_b["tokens"]) == (summary_a["samples"], summary_a["tokens"])
    assert summary_b["wall_seconds"] > summary_b["history"][every - 1]["wall_s"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "b" / "runs" / "lora"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, steps + 1))


# ------------------------------------------------------------------------------------------ dry runs and bad input

# name -> (script, config directory, extra options, expected report: exact line or trainable%)
DRY = {
    "lora_6b": ("lora", "chatglm-6b", [],
                "trainable params: 3,670,016 || all params: 6,176,956,416 || trainable%: 0.0594"),
    "freeze_150k": ("freeze", "chatglm-6b-150k", [], "16.0970"),
    "lora_150k": ("lora", "chatglm-6b-150k", ["--lora_r", "8"], "0.0586"),
    "pt_projection_150k": ("pt", "chatglm-6b-150k", ["--prefix_projection"], "13.2644"),
    # a boolean turned off again: the last flag wins, so this is P-Tuning without the projection
    "pt_150k": ("pt", "chatglm-6b-150k", ["--prefix_projection", "--no-prefix_projection"],
                "trainable params: 3,670,016 || all params: 6,258,876,416 || trainable%: 0.0586"),
}
SEEDS = {"freeze_150k": 16.10, "pt_projection_150k": 13.26, "lora_150k": 0.0586, "pt_150k": 0.0586}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Dry runs (config.json only, meta device) and runs that must fail early, all started at once."""
    work = tmp_path_factory.mktemp("quick")
    pool = Pool(work)
    for name, (script, config, extra, _) in DRY.items():
        if (CONFIGS / config / "config.json").is_file():
            pool.start(name, [sys.executable, f"finetuning_{script}.py", "--dry_run", "--model_dir",
                              str(CONFIGS / config / "config.json"), *extra])
    lines = (ROOT / "data" / "sample_train.jsonl").read_text(encoding="utf-8").splitlines()
    bad = work / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1], '{"text": "断路器", "answer": ', lines[2]]) + "\n", encoding="utf-8")
    pool.start("bad_line", [sys.executable, "finetuning_lora.py", *SMALL, "--train_path", str(bad), "--max_steps", "2",
                            "--output_dir", str(work / "bad_line")])
    pool.start("bad_lengths", [sys.executable, "finetuning_lora.py", "--model_dir", "tiny", "--max_src_len", "800",
                               "--max_len", "768", "--output_dir", str(work / "bad_lengths")])
    pool.start("diverges", [sys.executable, "finetuning_embedding.py", *SMALL, "--learning_rate", "1e30",
                            "--warmup_ratio", "0", "--max_steps", "8", "--output_dir", str(work / "diverges")])
    yield work, pool
    pool.close()


@pytest.mark.parametrize("name", DRY)
def test_dry_run_reports_the_seeds_counts(quick, name):
    script, config, _, expected = DRY[name]
    if not (CONFIGS / config / "config.json").is_file():
        pytest.skip(f"{CONFIGS / config} is absent (../shared is not beside this checkout)")
    _, pool = quick
    done = pool.result(name)
    assert done.rc == 0, done.tail()
    found = REPORT.search(done.output)
    assert found, done.tail()
    if expected.startswith("trainable"):
        assert found.group(0) == expected
    else:
        assert found.group(3) == expected
    if name in SEEDS:  # the seeds published these with two decimals (or as 0.0586)
        assert abs(float(found.group(3)) - SEEDS[name]) < 0.005
    assert "what trains:" in done.output


def test_malformed_line_names_file_and_line(quick):
    work, pool = quick
    done = pool.result("bad_line")
    assert done.rc != 0
    assert f"{work / 'bad.jsonl'}:3: not valid JSON" in done.output, done.tail()
    assert not (work / "bad_line").exists() or not checkpoints(work / "bad_line")


def test_impossible_lengths_fail_with_a_sentence(quick):
    work, pool = quick
    done = pool.result("bad_lengths")
    assert done.rc == 2, done.tail()  # argparse's usage error, before anything is loaded
    assert "--max_src_len (800) must be below --max_len - 3 (765)" in done.output
    assert "Traceback" not in done.output
    assert not (work / "bad_lengths").exists()


def test_diverging_run_stops_with_a_diagnosis_and_saves_nothing(quick):
    work, pool = quick
    done = pool.result("diverges")
    assert done.rc != 0
    assert "NonFiniteLoss" in done.output and "lower --learning_rate" in done.output, done.tail()
    assert "of data/sample_train.jsonl" in done.output  # it names the records of the bad batch
    assert not checkpoints(work / "diverges")
