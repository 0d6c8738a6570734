"""Every method through the same scripts, data split, decoding and shared options; one report (``compare.py``).

A run is one (variant, seed) in ``<output_dir>/<variant>/seed<k>/``: training through ``deepspeed --num_gpus N
finetuning_<method>.py`` (``--launcher python``: one plain process), then ``predict_<method>.py`` with greedy
decoding. Its numbers, or its error (the last meaningful line of the failing step's log), go to ``result.json``
there, and glmft.report turns all of them into the comparison. A complete run made with the same settings is
skipped unless ``--force``; a failed one is always run again. The settings that decide "the same" include a hash
of the train and test files' contents, so editing a data file in place runs everything again. ``--hostfile``
spreads each training run over several nodes (deepspeed's multi-node launcher; README "Several nodes").
``--task`` (passed to every training run, recorded in its meta.json) decides the metrics; ``--base`` adds one run
that only predicts with the untuned base model (``predict.py --model_dir``), the report's first row.
``--retention_path`` has every prediction measure forgetting (glmft.retention; 0 for the base row by definition).
The command lines themselves are built in glmft.compare_cmd.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glmft import checkpoint, launch, report, retention, shipped, tasks
from glmft.args import TrainArgs, opt, parse_one
from glmft.compare_cmd import (
    KINDS,
    SEED_VARIANTS,
    SHARED,
    VARIANTS,
    base_argv,
    base_labels,
    launcher,
    method_args,
    predict_argv,
    train_argv,
)
from glmft.tuners import TUNERS

ROOT = Path(__file__).resolve().parents[1]
BASE = "base"  # the row of the untuned base model (--base)


@dataclass
class CompareArgs:
    model_dir: str = opt("tiny", "base model directory (or 'tiny'; for --dry_run also a config.json)")
    train_path: str = opt("data/sample_train.jsonl", "training file, the same for every method")
    test_path: str = opt("data/sample_test.jsonl", "test file, the same for every method")
    methods: str = opt(",".join(SEED_VARIANTS), "comma-separated variants, or 'all' (every one, grouped by kind: "
                       "selective, soft prompts, additive modules, reparameterised): pt trains the prefix through the "
                       "projection MLP, pt_noproj without it (the seeds' 'PT-Only-Embedding'); also bitfit, ia3, "
                       "adapter")
    seeds: str = opt("1234", "comma-separated training seeds; several give mean ± std")
    output_dir: str = opt("results", "where the runs, their TensorBoard logs (runs/) and the comparison go")
    task: str = opt(tasks.DEFAULT, f"what every method learns and is scored on: {', '.join(tasks.TASKS)} (its "
                    "headline metric fills 测试结果)")
    input_key: str = opt("", "record field of the input, for data in no layout of the task (with --target_key)")
    target_key: str = opt("", "record field of the target (with --input_key)")
    labels: str = opt("", "classification: the label set, a file or a comma list (default: labels.json beside the "
                      "data, else the training labels)")
    prompt_text: str | None = opt(None, "instruction before each record's input (default: the task's prompt)")
    constrain_labels: bool = opt(False, "classification: generate only label strings (no invalid answers)")
    base: bool = opt(False, "also score the untuned base model, as the first row (the seeds' 原始模型)")
    retention_path: str = opt("", "forgetting: general prompts (data/retention.jsonl ships), passed to every "
                              "prediction; the report's forgetting ΔNLL and answers changed (empty: not measured)")
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
    num_gpus: int = opt(1, "GPUs per run, per node with --hostfile (deepspeed --num_gpus)")
    hostfile: str = opt("", "deepspeed --hostfile for multi-node runs: one 'HOST slots=GPUS' line per node; the "
                        "repository, model, data and output_dir must sit at the same paths on every node")
    num_nodes: int = opt(0, "deepspeed --num_nodes: the first N hosts of --hostfile (0: all of them)")
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
        self.nodes()  # a hostfile that deepspeed would refuse fails here, before any run
        TrainArgs(**{name: getattr(self, name) for name in SHARED})  # the scripts' own checks, before any run
        tasks.layouts(self.task, self.input_key, self.target_key)  # an unknown task or half a key pair fails here
        if (self.constrain_labels or self.labels) and not tasks.get(self.task).USES_LABELS:
            raise ValueError(f"--labels and --constrain_labels need a task with a label set; {self.task} has none")
        if self.retention_path:  # a missing or malformed prompt file fails here, before any run
            self.retention_path = shipped.resolve(self.retention_path)
            retention.load_prompts(self.retention_path)
        for variant in self.variants():
            method_args(self, variant)  # a method option its script would refuse fails here, before any run

    def variants(self) -> list[str]:
        if self.methods.strip() == "all":
            return [v for group in KINDS.values() for v in group]
        return [v.strip() for v in self.methods.split(",") if v.strip()]

    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.replace(" ", "").split(",")]

    def nodes(self) -> list[str]:
        """The hosts of --hostfile a run uses (``[]`` on one machine), checked as deepspeed reads the file."""
        if not self.hostfile:
            if self.num_nodes:
                raise ValueError("--num_nodes needs --hostfile (the nodes to choose from)")
            return []
        if self.launcher == "python":
            raise ValueError("--hostfile needs --launcher deepspeed: one plain python process cannot span nodes")
        return launch.hostfile_nodes(self.hostfile, self.num_nodes, self.num_gpus)

    def world_size(self) -> int:
        return self.num_gpus * max(1, len(self.nodes()))

    def options(self, variant: str) -> list[str]:
        """The variant's fixed flags, then its --method_option arguments."""
        given = [shlex.split(o.partition("=")[2]) for o in self.method_option if o.partition("=")[0] == variant]
        return [*VARIANTS[variant][1], *(a for args in given for a in args)]



def file_digest(path: str) -> str | None:
    """sha256 of a file's bytes (None if absent: its run fails and records why)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def run_one(args: CompareArgs, variant: str, seed: int, ds_config: Path) -> dict:
    """Train and predict one (variant, seed), or only predict with the base model (``variant`` BASE); or return its
    earlier result when that is complete and current."""
    name, run_dir = f"{variant}-seed{seed}", Path(args.output_dir) / variant / f"seed{seed}"
    base = variant == BASE
    lr = None if base else method_args(args, variant)[1]
    data = {"train": file_digest(args.train_path), "test": file_digest(args.test_path),
            **({"retention": file_digest(args.retention_path)} if args.retention_path else {})}
    settings = {"predict": base_argv(args, run_dir), "data": data} if base else {
        "train": train_argv(args, variant, seed, lr), "predict": predict_argv(args),
        "deepspeed": json.loads(ds_config.read_text()), "launch": [args.launcher, args.num_gpus, args.nodes()],
        "data": data}
    old = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else {}
    if old.get("status") == "ok" and old.get("settings") == settings and not args.force:
        print(f"[{name}] skipped: {run_dir / 'result.json'} exists (--force runs it again)", flush=True)
        return old
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(Path(args.output_dir) / "runs" / name, ignore_errors=True)  # TensorBoard: this run's curve only
    run_dir.mkdir(parents=True)
    result = {"variant": variant, "method": BASE if base else VARIANTS[variant][0], "seed": seed, "status": "failed",
              "learning_rate": lr, "method_options": [] if base else args.options(variant), "settings": settings,
              "commands": {}}
    first = base_labels(args, run_dir) if base else train(args, result, run_dir, ds_config)
    failure = first or predict(result, run_dir)
    if failure:
        result.update(stage=failure[0], error=failure[1])
        print(f"[{name}] FAILED in {failure[0]}: {failure[1]}", flush=True)
    else:
        result["status"] = "ok"
        headline = tasks.get(args.task).HEADLINE
        forgot = result["metrics"].get("retention", {}).get("nll_delta")
        print(f"[{name}] done: {headline} {result['metrics'].get(headline, float('nan')):.4f}"
              + (f", forgetting ΔNLL {forgot:+.4f}" if forgot is not None else ""), flush=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def train(args: CompareArgs, result: dict, run_dir: Path, ds_config: Path) -> tuple[str, str] | None:
    """The training step of a run; its summary and checkpoint go into ``result``. Returns the failure, if any."""
    name = f"{result['variant']}-seed{result['seed']}"
    cmd = launcher(args) + [str(ROOT / f"finetuning_{result['method']}.py"), *result["settings"]["train"],
                            "--output_dir", str(run_dir / "train"), "--deepspeed_config", str(ds_config),
                            "--tensorboard_dir", str(Path(args.output_dir) / "runs"), "--run_name", name]
    print(f"[{name}] training", flush=True)
    code, result["train_process_s"], text = launch.execute(cmd, run_dir / "train.log")
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
    script, ckpt = ("predict.py", []) if result["method"] == BASE else (
        f"predict_{result['method']}.py", ["--ckpt_dir", result["checkpoint"]])
    cmd = [sys.executable, str(ROOT / script), *ckpt, *result["settings"]["predict"], "--output_dir",
           str(run_dir / "predict")]
    print(f"[{result['variant']}-seed{result['seed']}] predicting", flush=True)
    code, result["predict_process_s"], text = launch.execute(cmd, run_dir / "predict.log")
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
        setting = estimate.setting_for(config, args.train_batch_size, args.max_len, args.max_src_len,
                                       args.world_size())
        print(estimate.report(args.model_dir, methods, args.quantization_bit, setting))
        return []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ds_config.json").write_text(json.dumps(config, indent=2) + "\n")
    runs = [(BASE, args.seed_list()[0])] if args.base else []  # greedy decoding: one base run, whatever the seeds
    runs += [(variant, seed) for variant in args.variants() for seed in args.seed_list()]
    results = [run_one(args, variant, seed, (out / "ds_config.json").resolve()) for variant, seed in runs]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    written = report.write(out, results, {**asdict(args), "device": device, "zero_stage": stage,
                                          "world_size": args.world_size()})
    print("\nwritten:\n" + "\n".join(written))
    return results


def main(description: str, argv: list[str] | None = None) -> int:
    """``compare.py``: every run, then the report; the exit code is 1 when any run failed (the report is written
    first, with each failure's reason), so a script or CI job calling compare.py sees the failure."""
    args = parse_one(CompareArgs, description, argv)
    results = run(args)
    failed = [f"{r['variant']}-seed{r['seed']}" for r in results if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
