"""Batched, deterministic prediction from a training checkpoint, scored with glmft.metrics.

Everything the checkpoint's ``meta.json`` recorded (method and its arguments, prefix length and projection, base
model, prompt and lengths) is reused, so a prediction always rebuilds the model the weights were trained on.
"""

from __future__ import annotations

import json
import os
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList

from chatglm.modeling_chatglm import SafeScoresProcessor
from chatglm.quantization import is_quantized
from glmft import checkpoint, metrics, shipped
from glmft.args import opt
from glmft.data import read_records, record_prompt_ids
from glmft.model import build_model, load_tokenizer, model_path

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What prediction reads from meta.json; a checkpoint without one of these was not written by this project's training.
META_FIELDS = ("method", "method_args", "base_model", "data")
DATA_FIELDS = ("max_len", "max_src_len", "prompt_text")


@dataclass
class PredictArgs:
    test_path: str = opt("data/sample_test.jsonl", "JSON-lines test file (same layouts as training)")
    ckpt_dir: str = opt("", "a training checkpoint (checkpoint-<step>/), or an output dir: its latest checkpoint")
    model_dir: str = opt("", "base model directory (default: the one recorded in the checkpoint's meta.json)")
    output_dir: str = opt("", "where predictions.jsonl and metrics.json go (default: <checkpoint>/predict)")
    batch_size: int = opt(8, "prompts generated together (left padded, KV cache)")
    max_new_tokens: int = opt(0, "answer length limit (default: the checkpoint's max_len - max_src_len)")
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    top_p: float = opt(0.7, "nucleus sampling mass (with --do_sample)")
    temperature: float = opt(0.95, "sampling temperature (with --do_sample)")
    num_beams: int = opt(1, "beam search width (1: no beam search)")
    merge: bool = opt(True, "LoRA: fold the adapter into the base weights for speed (same outputs)")
    seed: int = opt(1234, "random seed (sampling)")
    limit: int = opt(0, "only the first N test records (0: all)")
    dtype: str = opt("auto", "auto (on CUDA the dtype the checkpoint was trained in, from its meta.json; fp32 on the "
                     "CPU, where half precision is slow), fp32, fp16 or bf16")

    def __post_init__(self) -> None:
        if not self.ckpt_dir:
            raise ValueError("--ckpt_dir is required: a checkpoint written by a finetuning_<method>.py run")
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 0 or self.limit < 0:
            raise ValueError("--batch_size and --num_beams must be >= 1, --max_new_tokens and --limit >= 0")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        self.test_path = shipped.resolve(self.test_path)


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


def load(args: PredictArgs, tuner: types.ModuleType, device: torch.device):
    """Base model + the method's weights, exactly as trained; eval mode (dropout off)."""
    ckpt = resolve_checkpoint(args.ckpt_dir)
    meta = checkpoint.read_meta(ckpt)
    check_meta(meta, ckpt / checkpoint.META_FILE)
    if meta["method"] != tuner.NAME:
        raise ValueError(f"{ckpt} is a '{meta['method']}' checkpoint; use predict_{meta['method']}.py for it "
                         f"(this is predict_{tuner.NAME}.py)")
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


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int,
             **gen_kwargs) -> tuple[list[list[int]], list[int]]:
    """New tokens per prompt, in input order, and per prompt the generation steps whose scores held a NaN/inf
    (summed over its beams). Prompts are batched by length (less padding); a batch gives the same tokens as one
    prompt at a time, so the order does not change any output."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    nonfinite = [0] * len(prompts)
    safe = SafeScoresProcessor(tokenizer)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="predict", unit="batch", dynamic_ncols=True):
        chunk = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in chunk]}, return_tensors="pt").to(device)
        safe.reset()
        out = model.generate(**batch, logits_processor=LogitsProcessorList([safe]),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
        counted = safe.nonfinite_steps  # None if generate() never scored a token
        steps = counted.view(len(chunk), -1).sum(dim=1).tolist() if counted is not None else [0] * len(chunk)
        for i, row, bad in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), steps, strict=True):
            end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            outputs[i] = [t for t in row[:end] if t != tokenizer.pad_token_id]
            nonfinite[i] = bad
    return outputs, nonfinite


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


def run(args: PredictArgs, tuner: types.ModuleType) -> dict:
    """Predict the test file, write predictions.jsonl + metrics.json, print the summary; returns the metrics."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, ckpt, meta = load(args, tuner, device)
    data = meta["data"]
    records = read_records(args.test_path, data["prompt_text"])[: args.limit or None]
    prompts = [record_prompt_ids(r, tokenizer, data["max_src_len"]) for r in records]
    gen = {"max_new_tokens": args.max_new_tokens or data["max_len"] - data["max_src_len"], "do_sample": args.do_sample,
           "num_beams": args.num_beams}
    if args.do_sample:
        gen.update(top_p=args.top_p, temperature=args.temperature)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    token_ids, nonfinite = generate(model, tokenizer, prompts, args.batch_size, **gen)
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    seconds = time.perf_counter() - start
    result = metrics.score([r.target for r in records], answers)
    result.update(test_seconds=seconds, records_per_s=len(records) / seconds, checkpoint=str(ckpt),
                  method=tuner.NAME, dtype=str(model.dtype).removeprefix("torch."), settings={**asdict(args), **gen},
                  nonfinite_logits={"records": sum(n > 0 for n in nonfinite), "positions": sum(nonfinite)})
    out_dir = Path(args.output_dir) if args.output_dir else ckpt / "predict"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"line": r.line, "text": r.text, "gold": r.target, "generated": a,
             "triples": [list(t) for t in metrics.parse_triples(a).triples],
             "scores": metrics.record_scores(r.target, a), "nonfinite_positions": n}
            for r, a, n in zip(records, answers, nonfinite, strict=True)]
    write_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_atomic(out_dir / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(metrics.format_summary(result))
    if result["nonfinite_logits"]["records"]:
        print(nonfinite_warning(result, len(records)))
    print(f"test time: {seconds:.2f} s for {len(records)} records ({result['records_per_s']:.2f} records/s, "
          f"batch {args.batch_size}); written to {out_dir}")
    return result
