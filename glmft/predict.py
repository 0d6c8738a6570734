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
from glmft import checkpoint, metrics
from glmft.args import opt
from glmft.data import read_records, record_prompt_ids
from glmft.model import build_model, load_tokenizer


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

    def __post_init__(self) -> None:
        if not self.ckpt_dir:
            raise ValueError("--ckpt_dir is required: a checkpoint written by a finetuning_<method>.py run")
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 0 or self.limit < 0:
            raise ValueError("--batch_size and --num_beams must be >= 1, --max_new_tokens and --limit >= 0")


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / checkpoint.META_FILE).is_file():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise FileNotFoundError(f"--ckpt_dir {path}: neither a checkpoint (no meta.json) nor a directory holding one")
    return found


def load(args: PredictArgs, tuner: types.ModuleType, device: torch.device):
    """Base model + the method's weights, exactly as trained; eval mode (dropout off)."""
    ckpt = resolve_checkpoint(args.ckpt_dir)
    meta = checkpoint.read_meta(ckpt)
    if meta["method"] != tuner.NAME:
        raise ValueError(f"{ckpt} is a '{meta['method']}' checkpoint; use predict_{meta['method']}.py for it "
                         f"(this is predict_{tuner.NAME}.py)")
    method_args = tuner.Args(**meta["method_args"])
    model_dir = args.model_dir or meta["base_model"]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
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
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, **gen_kwargs) -> list[list[int]]:
    """New tokens per prompt, in input order. Prompts are batched by length (less padding); a batch gives the
    same tokens as one prompt at a time, so the order does not change any output."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    processors = LogitsProcessorList([SafeScoresProcessor(tokenizer)])
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="predict", unit="batch", dynamic_ncols=True):
        chunk = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in chunk]}, return_tensors="pt").to(device)
        out = model.generate(**batch, logits_processor=processors, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
        for i, row in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
            end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            outputs[i] = [t for t in row[:end] if t != tokenizer.pad_token_id]
    return outputs


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip()
               for ids in generate(model, tokenizer, prompts, args.batch_size, **gen)]
    seconds = time.perf_counter() - start
    result = metrics.score([r.target for r in records], answers)
    result.update(test_seconds=seconds, records_per_s=len(records) / seconds, checkpoint=str(ckpt),
                  method=tuner.NAME, settings={**asdict(args), **gen})
    out_dir = Path(args.output_dir) if args.output_dir else ckpt / "predict"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"line": r.line, "text": r.text, "gold": r.target, "generated": a,
             "triples": [list(t) for t in metrics.parse_triples(a).triples],
             "scores": metrics.record_scores(r.target, a)} for r, a in zip(records, answers, strict=True)]
    write_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_atomic(out_dir / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(metrics.format_summary(result))
    print(f"test time: {seconds:.2f} s for {len(records)} records ({result['records_per_s']:.2f} records/s, "
          f"batch {args.batch_size}); written to {out_dir}")
    return result
