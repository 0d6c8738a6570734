"""Every method through the same scripts, data split, decoding and shared options; one report (``compare.py``).

A run is one (variant, seed) in ``<output_dir>/<variant>/seed<k>/``: training through ``deepspeed --num_gpus N
finetuning_<method>.py`` (``--launcher python``: one plain process), then ``predict_<method>.py`` with greedy
decoding. Its numbers, or its error (the last meaningful line of the failing step's log), go to ``result.json``
there, and glmft.report turns all of them into the comparison. A complete run made with the same settings is
skipped unless ``--force``; a failed one is always run again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from glmft import checkpoint, report
from glmft.args import TrainArgs, add_dataclass, opt
from glmft.tuners import TUNERS

ROOT = Path(__file__).resolve().parents[1]
# variant -> (method, its fixed flags). pt_noproj is the seeds' "PT-Only-Embedding".
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "freeze": ("freeze", ()), "embedding": ("embedding", ()), "pt": ("pt", ("--prefix_projection",)),
    "pt_noproj": ("pt", ("--no-prefix_projection",)), "lora": ("lora", ()),
}
SHARED = ("num_train_epochs", "max_steps", "train_batch_size", "gradient_accumulation_steps", "max_len",
          "max_src_len", "gradient_checkpointing", "quantization_bit", "log_steps")


@dataclass
class CompareArgs:
    model_dir: str = opt("tiny", "base model directory (or 'tiny'; for --dry_run also a config.json)")
    train_path: str = opt("data/sample_train.jsonl", "training file, the same for every method")
    test_path: str = opt("data/sample_test.jsonl", "test file, the same for every method")
    methods: str = opt(",".join(VARIANTS), "comma-separated variants: pt trains the prefix through the projection "
                       "MLP, pt_noproj without it (the seeds' 'PT-Only-Embedding')")
    seeds: str = opt("1234", "comma-separated training seeds; several give mean ± std")
    output_dir: str = opt("results", "where the runs, their TensorBoard logs (runs/) and the comparison go")
    num_train_epochs: int = opt(1, "passes over the training data")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)")
    train_batch_size: int = opt(2, "micro-batch size per device")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_len: int = opt(768, "longest training sequence in tokens")
    max_src_len: int = opt(450, "longest prompt + text in tokens")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (every method)")
    quantization_bit: int = opt(0, "quantize the base to 4 or 8 bits (every method)")
    log_steps: int = opt(10, "optimizer steps between logged losses (the loss curves' resolution)")
    deepspeed_config: str = opt("ds_config.json", "DeepSpeed settings every run starts from")
    zero_stage: int | None = opt(None, "ZeRO stage for training and the estimate (default: the config's)")
    num_gpus: int = opt(1, "GPUs per run (deepspeed --num_gpus; the estimate's world size)")
    launcher: str = opt("deepspeed", "deepspeed, or python (one process without the launcher)")
    method_option: tuple[str, ...] = opt((), "extra training options of one variant, repeatable: "
                                         "freeze=--num_trainable_layers=1 or 'lora=--lora_r 16'")
    predict_batch_size: int = opt(8, "prompts generated together")
    max_new_tokens: int = opt(0, "answer length limit (0: max_len - max_src_len)")
    limit: int = opt(0, "only the first N test records (0: all)")
    keep_engine: bool = opt(False, "keep each checkpoint's DeepSpeed optimizer state (engine/, only for --resume)")
    force: bool = opt(False, "run again even where a complete result.json with the same settings exists")
    dry_run: bool = opt(False, "print the parameter table and a memory estimate per method; train nothing")

    def __post_init__(self) -> None:
        self.method_option = tuple(self.method_option)
        unknown = [v for v in self.variants() if v not in VARIANTS]
        bad = [o for o in self.method_option if "=" not in o or o.partition("=")[0] not in VARIANTS]
        if unknown or bad or not self.variants():
            raise ValueError(f"unknown variants {unknown} or options {bad}: variants are {', '.join(VARIANTS)}; an "
                             "option looks like freeze=--num_trainable_layers=1")
        if not re.fullmatch(r"\d+(,\d+)*", self.seeds.replace(" ", "")):
            raise ValueError(f"--seeds must be comma-separated integers, got {self.seeds!r}")
        if self.launcher not in ("deepspeed", "python") or (self.launcher == "python" and self.num_gpus != 1):
            raise ValueError("--launcher is deepspeed or python; python runs one process (--num_gpus 1)")
        if self.zero_stage not in (None, 0, 1, 2, 3) or self.num_gpus < 1:
            raise ValueError("--zero_stage must be 0-3 and --num_gpus at least 1")
        TrainArgs(**{name: getattr(self, name) for name in SHARED})  # the scripts' own checks, before any run
        for variant in self.variants():
            try:
                method_args(self, variant)  # a method option its script would refuse fails here, before any run
            except argparse.ArgumentError as err:
                raise ValueError(f"--method_option {variant}=...: {err}") from None

    def variants(self) -> list[str]:
        return [v.strip() for v in self.methods.split(",") if v.strip()]

    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.replace(" ", "").split(",")]

    def options(self, variant: str) -> list[str]:
        """The variant's fixed flags, then its --method_option arguments."""
        given = [shlex.split(o.partition("=")[2]) for o in self.method_option if o.partition("=")[0] == variant]
        return [*VARIANTS[variant][1], *(a for args in given for a in args)]


def method_args(args: CompareArgs, variant: str) -> tuple[Any, float]:
    """The variant's ``tuner.Args`` (other training options ignored) and learning rate: the method's own
    default, tuner.DEFAULT_LR, unless the variant's options set --learning_rate."""
    tuner = TUNERS[VARIANTS[variant][0]]
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    add_dataclass(parser, tuner.Args, variant)
    parser.add_argument("--learning_rate", type=float, default=tuner.DEFAULT_LR)
    known = vars(parser.parse_known_args(args.options(variant))[0])
    lr = known.pop("learning_rate")
    return tuner.Args(**known), lr


def train_argv(args: CompareArgs, variant: str, seed: int, lr: float) -> list[str]:
    """The training script's options: the shared ones, the method's learning rate, then the variant's own."""
    argv = ["--model_dir", args.model_dir, "--train_path", args.train_path, "--seed", str(seed), "--learning_rate",
            str(lr)]
    for name in SHARED:
        value = getattr(args, name)
        argv += [f"--{'' if value else 'no-'}{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return argv + args.options(variant)


def predict_argv(args: CompareArgs) -> list[str]:
    return ["--test_path", args.test_path, "--batch_size", str(args.predict_batch_size), "--max_new_tokens",
            str(args.max_new_tokens), "--limit", str(args.limit), "--no-do_sample", "--num_beams", "1"]


def launcher(args: CompareArgs) -> list[str]:
    if args.launcher == "python":
        return [sys.executable]
    with socket.socket() as s:  # a free rendezvous port: a run never collides with another job's
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    beside = Path(sys.executable).parent / "deepspeed"  # the launcher of this interpreter's DeepSpeed
    return [str(beside) if beside.is_file() else shutil.which("deepspeed") or "deepspeed", "--num_gpus",
            str(args.num_gpus), "--master_port", str(port)]


def execute(cmd: list[str], log_path: Path) -> tuple[int, float, str]:
    """Run ``cmd`` with its output going to ``log_path``; returns (exit code, seconds, output)."""
    print(f"  {shlex.join(cmd)}\n  log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except OSError as err:  # e.g. no deepspeed launcher on PATH
            log.write(f"OSError: cannot run {cmd[0]}: {err}\n")
            code = 127
    return code, time.perf_counter() - start, log_path.read_text(errors="replace")


def run_one(args: CompareArgs, variant: str, seed: int, ds_config: Path) -> dict:
    """Train and predict one (variant, seed), or return its earlier result when that is complete and current."""
    name, run_dir = f"{variant}-seed{seed}", Path(args.output_dir) / variant / f"seed{seed}"
    lr = method_args(args, variant)[1]
    settings = {"train": train_argv(args, variant, seed, lr), "predict": predict_argv(args),
                "deepspeed": json.loads(ds_config.read_text())}
    old = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else {}
    if old.get("status") == "ok" and old.get("settings") == settings and not args.force:
        print(f"[{name}] skipped: {run_dir / 'result.json'} exists (--force runs it again)", flush=True)
        return old
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(Path(args.output_dir) / "runs" / name, ignore_errors=True)  # TensorBoard: this run's curve only
    run_dir.mkdir(parents=True)
    result = {"variant": variant, "method": VARIANTS[variant][0], "seed": seed, "status": "failed",
              "learning_rate": lr, "method_options": args.options(variant), "settings": settings, "commands": {}}
    failure = train(args, result, run_dir, ds_config) or predict(result, run_dir)
    if failure:
        result.update(stage=failure[0], error=failure[1])
        print(f"[{name}] FAILED in {failure[0]}: {failure[1]}", flush=True)
    else:
        result["status"] = "ok"
        print(f"[{name}] done: sample F1 {result['metrics']['sample_f1']:.4f}", flush=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def train(args: CompareArgs, result: dict, run_dir: Path, ds_config: Path) -> tuple[str, str] | None:
    """The training step of a run; its summary and checkpoint go into ``result``. Returns the failure, if any."""
    name = f"{result['variant']}-seed{result['seed']}"
    cmd = launcher(args) + [str(ROOT / f"finetuning_{result['method']}.py"), *result["settings"]["train"],
                            "--output_dir", str(run_dir / "train"), "--deepspeed_config", str(ds_config),
                            "--tensorboard_dir", str(Path(args.output_dir) / "runs"), "--run_name", name]
    print(f"[{name}] training", flush=True)
    code, result["train_process_s"], text = execute(cmd, run_dir / "train.log")
    result["commands"]["train"] = cmd
    ckpt = checkpoint.latest(run_dir / "train")
    if code != 0 or ckpt is None:
        return "train", report.last_error(text, code)
    result["train"] = json.loads((run_dir / "train" / "train_summary.json").read_text())
    result.update(checkpoint=str(ckpt), checkpoint_bytes=sum(p.stat().st_size for p in ckpt.glob("*.safetensors")))
    if not args.keep_engine:
        shutil.rmtree(ckpt / "engine", ignore_errors=True)  # glmft.train.ENGINE_DIR: optimizer state for --resume
    return None


def predict(result: dict, run_dir: Path) -> tuple[str, str] | None:
    """The prediction step of a run; its scores go into ``result``. Returns the failure, if any."""
    cmd = [sys.executable, str(ROOT / f"predict_{result['method']}.py"), "--ckpt_dir", result["checkpoint"],
           *result["settings"]["predict"], "--output_dir", str(run_dir / "predict")]
    print(f"[{result['variant']}-seed{result['seed']}] predicting", flush=True)
    code, result["predict_process_s"], text = execute(cmd, run_dir / "predict.log")
    result["commands"]["predict"] = cmd
    if code != 0:
        return "predict", report.last_error(text, code)
    scores = json.loads((run_dir / "predict" / "metrics.json").read_text())
    result["metrics"] = {k: v for k, v in scores.items() if k != "settings"}  # settings: already in result
    return None


def deepspeed_config(args: CompareArgs) -> dict:
    """The DeepSpeed config of every run: --deepspeed_config with --zero_stage applied."""
    source = Path(args.deepspeed_config)
    config = json.loads((source if source.is_file() else ROOT / source).read_text())
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    return config


def run(args: CompareArgs) -> list[dict]:
    """Run (or skip) every variant and seed, then write the report; returns the runs' results."""
    config = deepspeed_config(args)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if args.dry_run:
        from glmft import estimate  # imported here: it builds models; a comparison run leaves that to the scripts

        methods = [(v, TUNERS[VARIANTS[v][0]], method_args(args, v)[0]) for v in args.variants()]
        setting = estimate.Setting(args.train_batch_size, args.max_len, args.max_src_len, stage, args.num_gpus)
        print(estimate.report(args.model_dir, methods, args.quantization_bit, setting))
        return []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ds_config.json").write_text(json.dumps(config, indent=2) + "\n")
    results = [run_one(args, variant, seed, (out / "ds_config.json").resolve())
               for variant in args.variants() for seed in args.seed_list()]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    written = report.write(out, results, {**asdict(args), "device": device, "zero_stage": stage})
    print("\nwritten:\n" + "\n".join(written))
    return results
