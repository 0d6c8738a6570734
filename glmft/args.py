"""Command-line options as dataclasses: one home per value, a help line per field, real booleans (--x / --no-x)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmft import shipped, tasks
from glmft.records import label_set, read_records


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    train_path: str = opt("data/sample_train.jsonl", "JSON-lines training file in a layout of --task ({text, "
                          "answer}, {instruction, input, output}, {content, summary}, {text, label}) or of "
                          "--input_key/--target_key")
    task: str = opt(tasks.DEFAULT, f"what is learnt and scored: {', '.join(tasks.TASKS)} (its prompt, record layouts "
                    "and metrics; recorded in meta.json for predict and compare)")
    input_key: str = opt("", "record field holding the input, for data in no layout of the task (with --target_key)")
    target_key: str = opt("", "record field holding the target (with --input_key)")
    labels: str | list[str] = opt("", "classification: the label set, a file (JSON list or one per line) or a comma "
                                  "list (default: labels.json beside --train_path, else the training labels)")
    model_dir: str = opt("tiny", "local model directory: ChatGLM-6B, ChatGLM2/3-6B (official layouts) or any "
                         "transformers causal LM; 'tiny' (random CPU stand-in) or 'mini' (small pretrained)")
    output_dir: str = opt("", "where checkpoints and TensorBoard runs go (default: output/<method>)")
    num_train_epochs: int = opt(1, "passes over the training data")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)")
    train_batch_size: int = opt(2, "micro-batch size per device")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step (DeepSpeed accumulates)")
    learning_rate: float | None = opt(None, "peak learning rate (default: the method's own, see --help epilog)")
    warmup_ratio: float = opt(0.1, "share of optimizer steps spent warming the learning rate up from 0")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    max_len: int = opt(768, "longest training sequence in tokens (prompt + text + answer + 3 special tokens)")
    max_src_len: int = opt(450, "longest prompt + text in tokens; the answer gets what is left of max_len")
    prompt_text: str | None = opt(None, "instruction put before each record's input, except {instruction, input, "
                                  "output} records, which carry their own (default: the task's prompt)")
    seed: int = opt(1234, "random seed (data order, dropout, new parameters)")
    tensorboard_dir: str = opt("", "TensorBoard log root (default: <output_dir>/runs); compare.py puts every run in "
                               "one root so the curves overlay")
    run_name: str = opt("", "this run's name under the TensorBoard root (default: the method name)")
    log_steps: int = opt(10, "optimizer steps between TensorBoard points and progress-bar updates")
    save_steps: int = opt(0, "optimizer steps between checkpoints (0: only at the end)")
    save_total_limit: int = opt(0, "keep only the newest N checkpoints (0: all); the best (by --save_best's eval "
                                "value with --eval_path, else the lowest logged training loss) and the one resumed "
                                "from are kept too")
    # evaluation while training (glmft/evaluate.py)
    eval_path: str = opt("", "JSON-lines eval file (same layouts as training): its mean loss per supervised token is "
                         "logged as eval/loss at every --eval_steps, every checkpoint and the end")
    eval_steps: int = opt(0, "optimizer steps between evaluations (0: only at checkpoints and the end)")
    eval_batch_size: int = opt(8, "eval records per forward pass on each rank")
    eval_metric_samples: int = opt(0, "also answer the first N eval records greedily (up to max_len - max_src_len "
                                   "new tokens) and log the task's headline metric as eval/<metric> (0: loss only)")
    save_best: str = opt("", "loss or metric: also checkpoint every evaluation that improves the eval loss (or the "
                         "headline metric), and keep the best of them whatever --save_total_limit says")
    quantization_bit: int = opt(0, "quantize the base model's layer matrices to 4 or 8 bits while loading (0: as "
                                "stored; a chatglm-6b-int4 directory is INT4 already)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: much less memory, ~30%% slower")
    deepspeed_config: str = opt("ds_config.json", "DeepSpeed engine settings (ZeRO stage, precision, clipping); "
                                "shipped: ds_config.json (ZeRO-1), ds_zero2.json, ds_zero3.json, "
                                "ds_zero3_offload.json (optimizer and parameters on the CPU)")
    resume: bool = opt(False, "continue from the latest checkpoint in output_dir (optimizer, scheduler, data "
                       "position and RNG included); refused if its meta.json records other settings")
    overwrite_output_dir: bool = opt(False, "start afresh in an output_dir holding an earlier run's results, "
                                     "deleting its checkpoints, train_summary.json and TensorBoard curves first")
    dry_run: bool = opt(False, "build the model on the meta device from config.json, print the parameter report, "
                        "exit")
    local_rank: int = opt(-1, "set by the deepspeed launcher")

    def __post_init__(self) -> None:
        if self.max_src_len >= self.max_len - 3:
            raise ValueError(f"--max_src_len ({self.max_src_len}) must be below --max_len - 3 ({self.max_len - 3}): "
                             "the answer needs room after the prompt and the 3 special tokens")
        for name in ("num_train_epochs", "train_batch_size", "gradient_accumulation_steps", "log_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.save_steps < 0 or self.save_total_limit < 0:
            raise ValueError("--max_steps, --save_steps and --save_total_limit must be 0 or positive")
        if self.resume and self.overwrite_output_dir:
            raise ValueError("--resume continues the run in output_dir, --overwrite_output_dir deletes it: use one")
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"--quantization_bit must be 0, 4 or 8, got {self.quantization_bit}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.check_eval()
        # Checked here, before any model is built (the optimizer would only refuse them after loading it).
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be a positive number, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight_decay must be 0 or a positive number, got {self.weight_decay}")
        # The shipped defaults (data/sample_train.jsonl, ds_config.json, ds_zero*.json) are found from any directory.
        self.train_path = shipped.resolve(self.train_path)
        self.deepspeed_config = shipped.resolve(self.deepspeed_config)
        self.eval_path = shipped.resolve(self.eval_path)
        self.resolve_task()

    def resolve_task(self) -> None:
        """The task's prompt unless --prompt_text is given; a labelled task's label set, resolved once here so that
        meta.json records the list itself (predict needs no training file)."""
        task = tasks.get(self.task)
        tasks.layouts(self.task, self.input_key, self.target_key)  # --input_key without --target_key fails here
        if self.prompt_text is None:
            self.prompt_text = task.DEFAULT_PROMPT
        if not task.USES_LABELS:
            if self.labels:
                raise ValueError(f"--labels is for a task with a label set; the {self.task} task has none")
            self.labels = []
            return
        if isinstance(self.labels, list):  # resolved already (a copy of resolved arguments)
            return
        if not Path(self.train_path).is_file():
            raise ValueError(f"--train_path {self.train_path}: no such file (the {self.task} task reads its labels)")
        records = read_records(self.train_path, self.prompt_text, self.task, self.input_key, self.target_key)
        self.labels = label_set(self.labels, self.train_path, records)[0]

    def check_eval(self) -> None:
        if self.eval_steps < 0 or self.eval_metric_samples < 0 or self.eval_batch_size < 1:
            raise ValueError("--eval_steps and --eval_metric_samples must be 0 or positive, --eval_batch_size >= 1")
        if self.save_best not in ("", "loss", "metric"):
            raise ValueError(f"--save_best must be loss or metric, got {self.save_best!r}")
        used = [name for name in ("eval_steps", "eval_metric_samples", "save_best") if getattr(self, name)]
        if used and not self.eval_path:
            raise ValueError(f"--{', --'.join(used)} evaluate on --eval_path, which is not set")
        if self.save_best == "metric" and not self.eval_metric_samples:
            raise ValueError("--save_best metric needs --eval_metric_samples N (the records the metric is scored on)")


def _field_type(tp: Any) -> type:
    """The concrete type of an annotation like ``float | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    return tp


def add_dataclass(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if tp is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        elif typing.get_origin(tp) in (list, tuple):  # a repeatable option; the dataclass gets a list
            group.add_argument(f"--{f.name}", action="append", default=list(f.default), help=help_text)
        else:
            shown = "" if f.default in (None, "") else " (default: %(default)s)"
            group.add_argument(f"--{f.name}", type=tp, default=f.default, help=help_text + shown)


def parse_one(cls: type, description: str, argv: list[str] | None = None, epilog: str | None = None) -> Any:
    """Parse a single options dataclass (the predict scripts' options)."""
    # allow_abbrev=False here and below: a misspelt option (--learning_rat) must fail, not silently match a prefix
    parser = argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False)
    add_dataclass(parser, cls, "options")
    ns = vars(parser.parse_args(argv))
    try:
        return cls(**ns)
    except ValueError as err:
        parser.error(str(err))


def training_parser(tuner: types.ModuleType, exit_on_error: bool = True) -> argparse.ArgumentParser:
    """The options of ``finetuning_<tuner>.py``: the shared training options plus ``tuner.Args``."""
    parser = argparse.ArgumentParser(
        description=tuner.__doc__.strip().splitlines()[0],
        epilog=f"The {tuner.NAME} method's default learning rate is {tuner.DEFAULT_LR}.",
        allow_abbrev=False, exit_on_error=exit_on_error,
    )
    add_dataclass(parser, TrainArgs, "training")
    add_dataclass(parser, tuner.Args, f"{tuner.NAME} method")
    return parser


def training_args(tuner: types.ModuleType, ns: dict[str, Any]) -> tuple[TrainArgs, Any]:
    """The parsed namespace as (TrainArgs, tuner.Args) with the method's defaults filled in; ValueError if invalid."""
    train = TrainArgs(**{f.name: ns[f.name] for f in dataclasses.fields(TrainArgs)})
    method = tuner.Args(**{f.name: ns[f.name] for f in dataclasses.fields(tuner.Args)})
    if not train.output_dir:
        train.output_dir = f"output/{tuner.NAME}"
    if train.learning_rate is None:
        train.learning_rate = tuner.DEFAULT_LR
    return train, method


def parse(tuner: types.ModuleType, argv: list[str] | None = None) -> tuple[TrainArgs, Any]:
    """Parse the shared training options plus ``tuner.Args``; invalid combinations fail with a readable message."""
    parser = training_parser(tuner)
    try:
        return training_args(tuner, vars(parser.parse_args(argv)))
    except ValueError as err:
        parser.error(str(err))


def parse_method(argv: list[str], names: list[str]) -> tuple[str, list[str]]:
    """``finetune.py``: take ``--method NAME`` (or ``--method=NAME``) out of ``argv``; (name, the other arguments).
    Without it, or with an unknown name, exit with usage naming the methods (``--help`` alone shows that too)."""
    parser = argparse.ArgumentParser(
        prog="finetune.py", allow_abbrev=False, add_help=False,
        description="Fine-tune with any method: finetune.py --method NAME [the shared and that method's options]. "
                    "`finetune.py --method NAME --help` lists them.")
    parser.add_argument("--method", choices=names, required="--help" not in argv and "-h" not in argv,
                        help="the fine-tuning method")
    known, rest = parser.parse_known_args(argv)
    if known.method is None:
        parser.print_help()
        raise SystemExit(0)
    return known.method, rest
