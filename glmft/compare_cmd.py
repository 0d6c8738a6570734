"""The command lines of compare.py's runs: the variants and the options every run shares, each variant's training
options checked by its script's own parser, and the argv of training, prediction and the base model's prediction.

What goes into these lists also decides whether an earlier run is current (glmft.compare keeps them in result.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmft import launch, tasks
from glmft.args import TrainArgs, training_args, training_parser
from glmft.tuners import TUNERS

if TYPE_CHECKING:  # glmft.compare imports this module
    from glmft.compare import CompareArgs

# variant -> (method, its fixed flags). pt_noproj is the seeds' "PT-Only-Embedding"; dora is LoRA with DoRA.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "freeze": ("freeze", ()), "embedding": ("embedding", ()), "pt": ("pt", ("--prefix_projection",)),
    "pt_noproj": ("pt", ("--no-prefix_projection",)), "lora": ("lora", ()),
    "bitfit": ("bitfit", ()), "ia3": ("ia3", ()), "adapter": ("adapter", ()), "full": ("full", ()),
    "prompt_tuning": ("prompt_tuning", ()), "p_tuning": ("p_tuning", ()), "dora": ("lora", ("--use_dora",)),
    "adalora": ("adalora", ()),
}
SEED_VARIANTS = ("freeze", "embedding", "pt", "pt_noproj", "lora")  # the default: the seeds' table and ours
# ``--methods all``: every variant, in the groups of the PEFT survey the seeds follow (the report keeps this order).
KINDS: dict[str, tuple[str, ...]] = {
    "selective": ("freeze", "bitfit", "embedding"), "soft prompts": ("prompt_tuning", "p_tuning", "pt", "pt_noproj"),
    "additive modules": ("adapter", "ia3"), "reparameterised": ("lora", "dora", "adalora"), "full": ("full",),
}
assert sorted(v for group in KINDS.values() for v in group) == sorted(VARIANTS), "every variant has one kind"


def kind_of(variant: str) -> str:
    """The variant's group in the report ("" for the base row and for variants this version does not know)."""
    return next((kind for kind, group in KINDS.items() if variant in group), "")


SHARED = ("num_train_epochs", "max_steps", "train_batch_size", "gradient_accumulation_steps", "max_len",
          "max_src_len", "gradient_checkpointing", "quantization_bit", "log_steps")
TASK_OPTIONS = ("task", "input_key", "target_key", "labels", "prompt_text")  # passed on when set (prompt: not None)
# Training options compare.py sets for every run itself: a --method_option may not change them.
OWNED = {"model_dir", "train_path", "output_dir", "seed", "deepspeed_config", "tensorboard_dir", "run_name",
         "resume", "dry_run", "local_rank", *SHARED, *TASK_OPTIONS}


def _option_name(token: str) -> str | None:
    """``--x=1`` / ``--no-x`` -> ``x``; a value -> None."""
    if not token.startswith("--"):
        return None
    name = token[2:].partition("=")[0]
    return name[3:] if name.startswith("no-") else name


def method_args(args: CompareArgs, variant: str) -> tuple[Any, float]:
    """The variant's ``tuner.Args`` and learning rate (tuner.DEFAULT_LR unless its options set --learning_rate),
    read by the training script's own parser with the shared options applied: an option the script does not know,
    a value it would refuse, or an option compare.py sets for every run fails here, before any run."""
    tuner = TUNERS[VARIANTS[variant][0]]
    options, where = args.options(variant), f"--method_option {variant}=..."
    taken = sorted({n for n in map(_option_name, options) if n in OWNED})
    if taken:
        raise ValueError(f"{where}: {', '.join('--' + n for n in taken)} is set by compare.py for every run; use "
                         "compare.py's own option so the report states it")
    parser = training_parser(tuner, exit_on_error=False)
    try:
        ns, unknown = parser.parse_known_args(options)
    except argparse.ArgumentError as err:
        raise ValueError(f"{where}: {err}") from None
    if unknown:
        raise ValueError(f"{where}: finetuning_{tuner.NAME}.py has no option {' '.join(unknown)} "
                         f"(python finetuning_{tuner.NAME}.py --help lists them)")
    try:
        train, method = training_args(tuner, {**vars(ns), **{n: getattr(args, n) for n in SHARED}})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return method, train.learning_rate


def train_argv(args: CompareArgs, variant: str, seed: int, lr: float) -> list[str]:
    """The training script's options: the shared ones, the method's learning rate, then the variant's own."""
    argv = ["--model_dir", args.model_dir, "--train_path", args.train_path, "--seed", str(seed), "--learning_rate",
            str(lr)]
    for name in SHARED:
        value = getattr(args, name)
        argv += [f"--{'' if value else 'no-'}{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return argv + task_argv(args) + args.options(variant)


def task_argv(args: CompareArgs, names: tuple[str, ...] = TASK_OPTIONS) -> list[str]:
    """The task options of training (and of the base model's prediction): the task, and the others where set."""
    given = [(name, getattr(args, name)) for name in names]
    return [a for name, value in given if value is not None and (value or name == "prompt_text")
            for a in (f"--{name}", value)]


def predict_argv(args: CompareArgs, labels: str | None = None) -> list[str]:
    """The prediction options; ``labels``: the label set's file, when not --labels."""
    labels = labels or args.labels
    return ["--test_path", args.test_path, "--batch_size", str(args.predict_batch_size), "--max_new_tokens",
            str(args.max_new_tokens), "--limit", str(args.limit), "--no-do_sample", "--num_beams", "1",
            f"--{'' if args.constrain_labels else 'no-'}constrain_labels", *(["--labels", labels] if labels else []),
            *(["--retention_path", args.retention_path] if args.retention_path else [])]


def base_argv(args: CompareArgs, run_dir: Path) -> list[str]:
    """predict.py with the base model alone, reading and scoring as the training runs do; a labelled task gets the
    label set training would record (``run_dir/labels.json``, written by :func:`base_labels`)."""
    labels = str(run_dir / "labels.json") if tasks.get(args.task).USES_LABELS else None
    return ["--model_dir", args.model_dir, "--max_len", str(args.max_len), "--max_src_len", str(args.max_src_len),
            *task_argv(args, ("task", "input_key", "target_key", "prompt_text")), *predict_argv(args, labels)]


def launcher(args: CompareArgs) -> list[str]:
    """The command prefix a training run starts with."""
    return launch.prefix(args.launcher, args.num_gpus, args.hostfile, args.num_nodes)


def base_labels(args: CompareArgs, run_dir: Path) -> tuple[str, str] | None:
    """The base row of a labelled task: the label set a training run would record, as ``run_dir/labels.json``."""
    if not tasks.get(args.task).USES_LABELS:
        return None
    try:
        train = TrainArgs(train_path=args.train_path, max_len=args.max_len, max_src_len=args.max_src_len,
                          **{name: getattr(args, name) for name in TASK_OPTIONS})
    except (ValueError, OSError) as err:
        return "labels", f"{type(err).__name__}: {err}"
    (run_dir / "labels.json").write_text(json.dumps(train.labels, ensure_ascii=False) + "\n", encoding="utf-8")
    return None
