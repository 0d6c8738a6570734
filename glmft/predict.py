"""Batched, deterministic prediction from a training checkpoint, or from the untuned base model, scored by the task.

Everything the checkpoint's ``meta.json`` recorded (method and its arguments, prefix length and projection, base
model, task, record fields, prompt, label set and lengths) is reused, so a prediction always rebuilds the model the
weights were trained on and reads the test file as training read its data; a checkpoint from before meta.json
recorded a task learnt the default task (glmft.tasks.DEFAULT). Without ``--ckpt_dir``, ``--model_dir`` alone predicts
with the untuned base model (compare.py's base row); the task options then stand for what training would record.
``--retention_path`` also measures forgetting (glmft.retention): the checkpoint's base model alone answers the general
prompts first and is freed before the fine-tuned model is built, so the two never share memory.
"""

from __future__ import annotations

import json
import os
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chatglm.quantization import is_quantized
from glmft import checkpoint, retention, shipped, tasks
from glmft.args import TrainArgs, opt
from glmft.data import label_set, read_records, record_prompt_ids
from glmft.decode import LabelTrie, generate
from glmft.model import build_model, load_tokenizer, model_path
from glmft.tuners import TUNERS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What prediction reads from meta.json; a checkpoint without one of these was not written by this project's training.
META_FIELDS = ("method", "method_args", "base_model", "data")
DATA_FIELDS = ("max_len", "max_src_len", "prompt_text")
BASE = "base"  # the method name of a prediction with the untuned base model
RETENTION_FILE = "retention.jsonl"  # forgetting, per prompt, beside predictions.jsonl


@dataclass
class PredictArgs:
    test_path: str = opt("data/sample_test.jsonl", "JSON-lines test file (same layouts as training)")
    ckpt_dir: str = opt("", "a training checkpoint (checkpoint-<step>/), or an output dir: its latest checkpoint; "
                        "without it, --model_dir alone predicts with the untuned base model")
    model_dir: str = opt("", "base model directory (default: the one recorded in the checkpoint's meta.json)")
    output_dir: str = opt("", "where predictions.jsonl and metrics.json go (default: <checkpoint>/predict; base "
                          "model: output/base/predict)")
    task: str = opt("", f"{', '.join(tasks.TASKS)} (default: the checkpoint's; base model: {tasks.DEFAULT})")
    prompt_text: str | None = opt(None, "instruction before each record's input (default: the checkpoint's; base "
                                  "model: the task's)")
    input_key: str = opt("", "record field of the input, with --target_key (default: the checkpoint's)")
    target_key: str = opt("", "record field of the target, with --input_key (default: the checkpoint's)")
    labels: str = opt("", "classification: the label set, a file or a comma list (default: labels.json beside "
                      "--test_path, else the checkpoint's training labels, else the test file's)")
    constrain_labels: bool = opt(False, "classification: generate only label strings (a prefix trie over their "
                                 "token ids), so no answer falls outside the label set")
    max_len: int = opt(0, "longest sequence (default: the checkpoint's; base model: the training default)")
    max_src_len: int = opt(0, "longest prompt + input (default: the checkpoint's; base model: the training default)")
    batch_size: int = opt(8, "prompts generated together (left padded, KV cache)")
    max_new_tokens: int = opt(0, "answer length limit (default: max_len - max_src_len; with --constrain_labels: the "
                              "longest label)")
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    top_p: float = opt(0.7, "nucleus sampling mass (with --do_sample)")
    temperature: float = opt(0.95, "sampling temperature (with --do_sample)")
    num_beams: int = opt(1, "beam search width (1: no beam search)")
    merge: bool = opt(True, "LoRA: fold the adapter into the base weights for speed (same outputs)")
    seed: int = opt(1234, "random seed (sampling)")
    limit: int = opt(0, "only the first N test records (0: all)")
    dtype: str = opt("auto", "auto (on CUDA the dtype the checkpoint was trained in, from its meta.json; fp32 on the "
                     "CPU, where half precision is slow), fp32, fp16 or bf16")
    retention_path: str = opt("", "forgetting: a JSON-lines file of general prompts (data/retention.jsonl ships); how "
                              "far the checkpoint moved from its base model on them goes into metrics.json (empty: "
                              "not measured; the base model alone: 0 by definition)")
    retention_max_new_tokens: int = opt(32, "forgetting: length limit of the base model's greedy answers")

    def __post_init__(self) -> None:
        if not self.ckpt_dir and not self.model_dir:
            raise ValueError("--ckpt_dir is required: a checkpoint written by a finetuning_<method>.py run (or "
                             "--model_dir alone, to predict with the untuned base model)")
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 0 or self.limit < 0:
            raise ValueError("--batch_size and --num_beams must be >= 1, --max_new_tokens and --limit >= 0")
        if self.retention_max_new_tokens < 1:
            raise ValueError(f"--retention_max_new_tokens must be >= 1, got {self.retention_max_new_tokens}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.task:
            tasks.get(self.task)
        self.test_path = shipped.resolve(self.test_path)
        self.retention_path = shipped.resolve(self.retention_path)


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / checkpoint.META_FILE).is_file():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise FileNotFoundError(f"--ckpt_dir {path}: neither a checkpoint (no meta.json) nor a directory holding one")
    return found


def check_meta(meta: dict, path: Path) -> None:
    """Every field prediction reads, named with the file when absent (rather than a bare KeyError later)."""
    absent = [k for k in META_FIELDS if k not in meta]
    absent += [f"data.{k}" for k in DATA_FIELDS if isinstance(meta.get("data"), dict) and k not in meta["data"]]
    if absent:
        raise ValueError(f"{path}: no {', '.join(absent)}; a training run of this project writes them (a checkpoint "
                         "from elsewhere needs its meta.json completed)")


def base_model_dir(args: PredictArgs, meta: dict, ckpt: Path) -> str:
    """--model_dir, or the base model recorded in meta.json, which must still be there."""
    if args.model_dir:
        return args.model_dir
    try:
        model_path(meta["base_model"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt / checkpoint.META_FILE}: the base model it records, {meta['base_model']}, "
                                "is missing (no config.json there); pass --model_dir with the base model's "
                                "directory") from None
    return meta["base_model"]


def predict_dtype(choice: str, meta: dict, ckpt: Path, device: torch.device) -> torch.dtype:
    """--dtype, or (auto) the training dtype on CUDA and fp32 on the CPU, where fp16/bf16 matmuls are slow or
    missing. A checkpoint from before meta.json recorded the dtype was trained with the shipped fp16 config."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type != "cuda":
        return torch.float32
    name = meta.get("dtype", "float16")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"{ckpt / checkpoint.META_FILE}: dtype {name!r} is not a torch dtype (float16, bfloat16, "
                         "float32); pass --dtype")
    if getattr(torch, name) == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        print(f"trained in bf16, which {torch.cuda.get_device_name(device)} lacks: predicting in fp32")
        return torch.float32
    return getattr(torch, name)


def base_meta(args: PredictArgs) -> dict:
    """What a training run would record, for the untuned base model: the task options, or the training defaults."""
    task = args.task or tasks.DEFAULT
    train = TrainArgs(task=task, prompt_text=args.prompt_text, labels=[], max_len=args.max_len or TrainArgs.max_len,
                      max_src_len=args.max_src_len or TrainArgs.max_src_len)
    data = {k: getattr(train, k) for k in (*DATA_FIELDS, "task", "labels")}
    return {"method": BASE, "method_args": {}, "base_model": args.model_dir, "data": data}


def open_checkpoint(args: PredictArgs, tuner: types.ModuleType | None) -> tuple[Path, dict, types.ModuleType]:
    """The checkpoint, its checked meta.json and its method's tuner (the script's, which must be the one it was
    trained with; the method from meta.json when ``tuner`` is None)."""
    ckpt = resolve_checkpoint(args.ckpt_dir)
    meta = checkpoint.read_meta(ckpt)
    check_meta(meta, ckpt / checkpoint.META_FILE)
    found = tuner or TUNERS.get(meta["method"])
    if found is None or meta["method"] != found.NAME:
        raise ValueError(f"{ckpt} is a '{meta['method']}' checkpoint; use predict_{meta['method']}.py for it "
                         f"(this is predict_{found.NAME if found else meta['method']}.py)")
    return ckpt, meta, found


def load(args: PredictArgs, tuner: types.ModuleType | None, device: torch.device):
    """Base model + the method's weights, exactly as trained (the method from meta.json when ``tuner`` is None), or
    the base model alone without --ckpt_dir; eval mode (dropout off)."""
    if not args.ckpt_dir:
        meta = base_meta(args)
        tokenizer = load_tokenizer(args.model_dir)
        model = build_model(args.model_dir, predict_dtype(args.dtype, meta, Path(args.model_dir), device))
        return model.to(device).eval(), tokenizer, None, meta
    ckpt, meta, tuner = open_checkpoint(args, tuner)
    method_args = tuner.Args(**meta["method_args"])
    model_dir = base_model_dir(args, meta, ckpt)
    dtype = predict_dtype(args.dtype, meta, ckpt, device)
    tokenizer = load_tokenizer(model_dir)
    model = tuner.apply(build_model(model_dir, dtype, meta.get("model_overrides", {})), method_args)
    checkpoint.load_weights(model, ckpt, tuner)
    if args.merge and hasattr(tuner, "merge"):
        if is_quantized(model):
            print("quantized base: the LoRA adapter stays unmerged (merging into INT4/INT8 would lose its precision)")
        else:
            model = tuner.merge(model)
    return model.to(device).eval(), tokenizer, ckpt, meta


def data_settings(args: PredictArgs, meta: dict) -> dict:
    """How to read and score the test file: meta.json's ``data`` (a checkpoint without a task learnt the default
    one), with the record fields, prompt and lengths given here on top."""
    data = {"task": tasks.DEFAULT, "input_key": "", "target_key": "", "labels": [], **meta["data"]}
    if args.task and args.task != data["task"]:
        raise ValueError(f"--task {args.task}: the checkpoint learnt the {data['task']} task (its meta.json)")
    given = {k: getattr(args, k) for k in ("input_key", "target_key", "max_len", "max_src_len") if getattr(args, k)}
    if args.prompt_text is not None:
        given["prompt_text"] = args.prompt_text
    return {**data, **given}


def base_overrides(meta: dict) -> dict:
    """The build options of the checkpoint's base model without its method: its quantization, and nothing the method
    added (P-Tuning's prefix encoder)."""
    return {k: v for k, v in meta.get("model_overrides", {}).items() if k == "quantization_bit"}


def base_reference(args: PredictArgs, tuner: types.ModuleType | None,
                   device: torch.device) -> retention.Reference:
    """The base model's greedy answers to the retention prompts and their NLL, in the checkpoint's dtype and
    quantization; the base model is freed before the caller builds the fine-tuned one."""
    prompts = retention.load_prompts(args.retention_path)  # a bad file fails before any model is built
    ckpt, meta, _ = open_checkpoint(args, tuner)
    model_dir = base_model_dir(args, meta, ckpt)
    base = build_model(model_dir, predict_dtype(args.dtype, meta, ckpt, device), base_overrides(meta)).to(device)
    ref = retention.reference(base, load_tokenizer(model_dir), prompts, args.retention_max_new_tokens,
                              args.batch_size)
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ref


def forgetting(args: PredictArgs, ref: retention.Reference | None, model, tokenizer) -> tuple[dict, list[dict]]:
    """metrics.json's ``retention`` block and retention.jsonl's rows. Without a reference the model is the untuned
    base model, which against itself moved nowhere: 0 by definition, not computed."""
    found = (retention.measure(ref, model, tokenizer, args.batch_size) if ref is not None
             else retention.untuned(len(retention.load_prompts(args.retention_path))))
    rows = found.pop("per_prompt")
    return {**found, "path": args.retention_path}, rows


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def nonfinite_warning(result: dict, n_records: int) -> str:
    bad = result["nonfinite_logits"]
    return (f"WARNING: NaN/inf logits at {bad['positions']} generated positions in {bad['records']} of {n_records} "
            "records (metrics.json: nonfinite_logits); those positions became fallback blanks, so these records' "
            f"scores measure a numerical failure, not the method. The checkpoint diverged, or {result['dtype']} "
            "overflows: try --dtype fp32 or bf16.")


def read_test(args: PredictArgs, data: dict) -> tuple[list, types.ModuleType, dict]:
    """The test records, the task and what its scorer needs besides them (the label set and where it came from)."""
    task = tasks.get(data["task"])
    records = read_records(args.test_path, data["prompt_text"], data["task"], data["input_key"],
                           data["target_key"])[: args.limit or None]
    if not task.USES_LABELS:
        if args.constrain_labels:
            raise ValueError(f"--constrain_labels needs a task with a label set; the {task.NAME} task has none")
        return records, task, {}
    trained = (data["labels"], "the checkpoint's training labels (meta.json)") if data["labels"] else None
    labels, source = label_set(args.labels, args.test_path, records, trained)
    return records, task, {"labels": labels, "label_source": source}


def run(args: PredictArgs, tuner: types.ModuleType | None = None) -> dict:
    """Predict the test file, write predictions.jsonl + metrics.json (+ the task's figures), print the summary;
    returns the metrics. ``tuner``: the script's method (None: the checkpoint's, or the base model alone)."""
    if tuner is not None and not args.ckpt_dir:
        raise ValueError(f"--ckpt_dir is required: predict_{tuner.NAME}.py scores a {tuner.NAME} checkpoint "
                         "(predict.py --model_dir alone predicts with the untuned base model)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = base_reference(args, tuner, device) if args.retention_path and args.ckpt_dir else None
    model, tokenizer, ckpt, meta = load(args, tuner, device)
    data = data_settings(args, meta)
    records, task, extra = read_test(args, data)
    prompts = [record_prompt_ids(r, tokenizer, data["max_src_len"]) for r in records]
    constraint = LabelTrie(tokenizer, extra["labels"]) if args.constrain_labels else None
    gen = {"max_new_tokens": args.max_new_tokens or data["max_len"] - data["max_src_len"], "do_sample": args.do_sample,
           "num_beams": args.num_beams}
    if constraint is not None:  # a label and its <eop>: longer is never used, shorter could cut a label
        gen["max_new_tokens"] = constraint.longest + 1
    if args.do_sample:
        gen.update(top_p=args.top_p, temperature=args.temperature)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    token_ids, nonfinite = generate(model, tokenizer, prompts, args.batch_size, constraint, **gen)
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    seconds = time.perf_counter() - start
    result = tasks.score(task, [r.gold for r in records], answers, extra.get("labels"))
    per_record = result.pop("per_record")
    result.update(task=task.NAME, n_records=len(records), test_seconds=seconds, records_per_s=len(records) / seconds,
                  checkpoint=str(ckpt) if ckpt else None, method=meta["method"],
                  dtype=str(model.dtype).removeprefix("torch."), settings={**asdict(args), **gen}, data=data,
                  nonfinite_logits={"records": sum(n > 0 for n in nonfinite), "positions": sum(nonfinite)},
                  **({"label_source": extra["label_source"]} if "label_source" in extra else {}))
    retained: list[dict] = []
    if args.retention_path:
        result["retention"], retained = forgetting(args, ref, model, tokenizer)
    out_dir = Path(args.output_dir or (ckpt / "predict" if ckpt else Path("output") / BASE / "predict"))
    write(out_dir, records, answers, per_record, nonfinite, result, retained)
    task.write_figures(result, out_dir)
    print(task.format_summary(result))
    if args.retention_path:
        print(retention.format_summary(result["retention"]))
    if result["nonfinite_logits"]["records"]:
        print(nonfinite_warning(result, len(records)))
    print(f"test time: {seconds:.2f} s for {len(records)} records ({result['records_per_s']:.2f} records/s, "
          f"batch {args.batch_size}); written to {out_dir}")
    return result


def write(out_dir: Path, records: list, answers: list[str], per_record: list[dict], nonfinite: list[int],
          result: dict, retained: list[dict] | None = None) -> None:
    """predictions.jsonl (one row per record: where it came from, gold, answer, its scores), metrics.json and, where
    forgetting was measured, retention.jsonl (one row per prompt: the base's and the tuned model's answers, NLLs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if retained:
        write_atomic(out_dir / RETENTION_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retained))
    else:  # an earlier run's rows would pass for this run's
        (out_dir / RETENTION_FILE).unlink(missing_ok=True)
    rows = [{"line": r.line, "text": r.text, "gold": r.gold, "generated": a, "scores": s, "nonfinite_positions": n}
            for r, a, s, n in zip(records, answers, per_record, nonfinite, strict=True)]
    write_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_atomic(out_dir / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
