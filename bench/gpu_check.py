"""Check every GPU path of the suite in one command, on a machine with one CUDA GPU (about 4-6 minutes, under 8)::

    python bench/gpu_check.py                       # one table at the end; exit code 1 if any check failed
    python bench/gpu_check.py --only train,memory   # some groups: logits, train, quant, memory, generate

A script, not a test. The groups, one table row per check (ok, FAIL, or skip with the reason):

- logits: the tiny model on CUDA in fp32, fp16 and bf16 against the CPU in fp32 (a left-padded batch; relative
  tolerances in TOLERANCE).
- train: each method trained 20 steps through the real ``deepspeed finetuning_<m>.py --model_dir tiny --max_steps 20
  --log_steps 5`` with the default ds_config.json (fp16 on a GPU, NCCL), then scored by ``predict_<m>.py``; all
  eleven run side by side on the one GPU.
- quant: an INT8 and an INT4 ``QuantizedLinear`` on CUDA (cpm_kernels where its kernels load, plain torch otherwise:
  the row says which and why) against the same layer on the CPU, forward and input gradient; the CUDA
  dequantization must equal the CPU's bit for bit.
- memory: one LoRA and one P-Tuning (``pre_seq_len`` 16) training step through DeepSpeed at the real chatglm-6b
  shapes with random weights (no checkpoint needed; config values in CHATGLM_6B), batch 2, max_len 768,
  max_src_len 450, each in its own process, peak allocated memory next to glmft.estimate's figure for the same
  setting (``compare.py --dry_run``'s "total GiB" less its 1 GiB CUDA allowance). FAIL if the peak exceeds it
  by more than 10%: the estimate is meant as an upper bound. Needs about 25 GiB of GPU memory.
- generate: greedy tokens/s at batch 1 and 8 on a small fp16 model (4 layers, hidden 512, the real vocabulary).

Without CUDA it says so and exits with code 2 at once. ``--cpu-smoke`` (for developers; tests/test_gpu_check.py
runs it) takes the same code paths on the CPU with tiny sizes and one method, so that the script cannot rot
unnoticed where no GPU is at hand; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, tiny  # noqa: E402
from glmft import launch, report  # noqa: E402

GROUPS = ("logits", "train", "quant", "memory", "generate")
# THUDM/chatglm-6b's config.json (as in ../shared/fixtures/configs/chatglm-6b): the real shapes, random weights.
CHATGLM_6B = dict(vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32,
                  inner_hidden_size=16384, max_sequence_length=2048, position_encoding_2d=True, layernorm_epsilon=1e-5,
                  mask_token_id=130000, gmask_token_id=130001, bos_token_id=130004, eos_token_id=130005,
                  pad_token_id=3)
SMALL = dict(CHATGLM_6B, num_layers=4, hidden_size=512, num_attention_heads=8, inner_hidden_size=2048)
SMOKE = dict(CHATGLM_6B, vocab_size=1000, num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=256,
             max_sequence_length=512, mask_token_id=990, gmask_token_id=991, bos_token_id=994, eos_token_id=995)
# Every method (tiny has 2 layers): fp16 through DeepSpeed is where the virtual tokens, AdaLoRA's per-step hook on the
# fp32 master copy and full fine-tuning's loss scaling can go wrong on a GPU and nowhere else.
METHODS = {"freeze": ["--num_trainable_layers", "1"], "embedding": [], "pt": [], "lora": [], "bitfit": [],
           "prompt_tuning": ["--num_virtual_tokens", "4"], "p_tuning": ["--num_virtual_tokens", "4"],
           "adapter": ["--adapter_size", "8"], "ia3": [], "adalora": [], "full": []}
# max |logits - CPU fp32 logits| / max |CPU fp32 logits| on the tiny model, per dtype on the device
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
PROMPTS = ["你好", "发动机的功率是多少？请用一句话回答。"]


@dataclass
class Row:
    check: str
    status: str  # ok, FAIL or skip
    detail: str
    seconds: float = 0.0


@dataclass
class Plan:
    device: torch.device
    smoke: bool
    work: Path


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32 on the CPU (inf when either holds a non-finite value)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def verdict(ok: bool) -> str:
    return "ok" if ok else "FAIL"


# ---- logits ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def check_logits(plan: Plan) -> list[Row]:
    model, tokenizer = tiny()  # fp32, CPU
    batch = dict(tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    real = batch["attention_mask"].bool()  # left padding: compare the real positions only
    reference = model(**batch).logits[real]
    rows = []
    for name, tolerance in TOLERANCE.items():
        dtype = getattr(torch, name)
        if plan.device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            rows.append(Row(f"logits {name}", "skip", "this GPU has no bf16"))
            continue
        start = time.perf_counter()
        moved = copy.deepcopy(model).to(plan.device, dtype)
        logits = moved(**{k: v.to(plan.device) for k, v in batch.items()}).logits.cpu()[real]
        diff = rel_diff(logits, reference)
        agree = (logits.float().argmax(-1) == reference.argmax(-1)).float().mean().item()
        rows.append(Row(f"logits {name} {plan.device.type} vs cpu fp32", verdict(diff <= tolerance),
                        f"max rel. diff {diff:.1e} (tolerance {tolerance:.0e}), argmax agrees at {agree:.0%}",
                        time.perf_counter() - start))
    return rows


# ---- train + predict through the real scripts ---------------------------------------------------------------
def run_logged(cmd: list[str], log: Path, timeout: int = 420) -> tuple[int, str]:
    """Run ``cmd`` in the repository root with its output to ``log``; (exit code, output)."""
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\ntimed out after {timeout} s\n")
            code = 124
    return code, log.read_text(errors="replace")


def train_and_predict(plan: Plan, method: str) -> Row:
    start, out = time.perf_counter(), plan.work / method
    steps, every = (2, 1) if plan.smoke else (20, 5)
    prefix = launch.prefix("python" if plan.smoke else "deepspeed", 1)
    train = [*prefix, str(ROOT / f"finetuning_{method}.py"), "--model_dir", "tiny", "--max_steps", str(steps),
             "--log_steps", str(every), "--output_dir", str(out), *METHODS[method]]
    code, text = run_logged(train, plan.work / f"{method}.train.log")
    name = f"train {steps} + predict {method}"
    if code:
        return Row(name, "FAIL", f"training: {report.last_error(text, code)}", time.perf_counter() - start)
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [h["train/loss"] for h in summary.get("history", [])]
    dtype = summary.get("dtype", "?")
    problems = [f"{len(losses)} logged losses, not {steps // every}"] if len(losses) != steps // every else []
    problems += ["a non-finite loss"] if not all(map(math.isfinite, losses)) else []
    problems += [f"trained in {dtype}, not fp16"] if plan.device.type == "cuda" and "16" not in dtype else []
    predict = [sys.executable, str(ROOT / f"predict_{method}.py"), "--ckpt_dir", str(out), "--limit", "8",
               "--max_new_tokens", "16", "--output_dir", str(out / "predict")]
    code, text = run_logged(predict, plan.work / f"{method}.predict.log")
    seconds = time.perf_counter() - start
    if code:
        return Row(name, "FAIL", f"predict: {report.last_error(text, code)}", seconds)
    scores = json.loads((out / "predict" / "metrics.json").read_text())
    detail = (f"{dtype.removeprefix('torch.')}, loss {losses[0]:.3f} -> {losses[-1]:.3f}; predict: "
              f"{scores.get('n_records')} records, F1 {scores.get('sample_f1', math.nan):.3f}")
    return Row(name, verdict(not problems), "; ".join(problems) or detail, seconds)


def check_training(plan: Plan) -> list[Row]:
    methods = ["lora"] if plan.smoke else list(METHODS)
    with ThreadPoolExecutor(len(methods)) as pool:  # tiny runs: side by side on the one GPU
        return list(pool.map(lambda m: guarded(f"train {m}", lambda: [train_and_predict(plan, m)])[0], methods))


# ---- INT4 / INT8 linear -------------------------------------------------------------------------------------
def check_quant(plan: Plan) -> list[Row]:
    from chatglm import quantization

    rows = []
    for bits in (8, 4):
        start = time.perf_counter()
        torch.manual_seed(bits)
        layer = quantization.QuantizedLinear.from_linear(torch.nn.Linear(1024, 768).half(), bits)
        x = torch.randn(4, 16, 1024)
        cpu_x = x.clone().requires_grad_()
        cpu_y = layer(cpu_x)  # the CPU path, in fp32
        cpu_y.square().sum().backward()
        device_layer = copy.deepcopy(layer).to(plan.device)
        dev_x = x.to(plan.device, torch.float16).requires_grad_()
        dev_y = device_layer(dev_x)
        dev_y.float().square().sum().backward()
        q, scale = device_layer.weight, device_layer.weight_scale
        backend, why = quantization._choose_backend(q, scale, bits)
        same = torch.equal(quantization.dequantize_for_matmul(q, scale, bits, torch.float16).cpu(),
                           quantization.dequantize_weight(layer.weight, layer.weight_scale, bits, torch.float16))
        out, grad = rel_diff(dev_y, cpu_y), rel_diff(dev_x.grad, cpu_x.grad)
        rows.append(Row(f"INT{bits} linear {plan.device.type} vs cpu", verdict(same and out < 3e-3 and grad < 3e-3),
                        f"{backend} ({why}); output rel. diff {out:.1e}, input grad {grad:.1e}, dequantized "
                        f"weight {'identical' if same else 'DIFFERS'}", time.perf_counter() - start))
    return rows


# ---- one training step at chatglm-6b shapes: peak memory against the estimate -------------------------------
def memory_case(method: str, smoke: bool) -> dict:
    """One DeepSpeed training step (this process alone); the peak memory and the estimate, in bytes."""
    import deepspeed

    from glmft import estimate, optim
    from glmft import train as loop
    from glmft.args import TrainArgs
    from glmft.tuners import TUNERS

    tuner = TUNERS[method]
    method_args = tuner.Args()
    overrides = tuner.model_overrides(method_args) if hasattr(tuner, "model_overrides") else {}
    config = ChatGLMConfig(**(SMOKE if smoke else CHATGLM_6B), **overrides)
    batch, max_len, max_src_len = (2, 64, 40) if smoke else (2, 768, 450)
    args = TrainArgs(deepspeed_config=str(ROOT / "ds_config.json"), train_batch_size=batch, max_len=max_len,
                     max_src_len=max_src_len, learning_rate=tuner.DEFAULT_LR)
    loop.init_distributed()
    ds_config = loop.engine_config(args, 10)
    with torch.device("meta"):
        shapes = tuner.apply(ChatGLMForConditionalGeneration(config).half(), method_args)
    est = estimate.estimate(shapes, estimate.setting_for(ds_config, batch, max_len, max_src_len, 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = torch.get_default_dtype()
    torch.set_default_dtype(loop.train_dtype(ds_config))  # built in the training dtype, on the GPU: no fp32 copy
    with device:
        model = ChatGLMForConditionalGeneration(config)
    torch.set_default_dtype(default)
    model = tuner.apply(model, method_args).train()
    model.config.use_cache = False
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,  # the optimizer groups glmft.train makes
                                      model_parameters=optim.param_groups(model, args.weight_decay))
    ids = torch.randint(10, min(config.vocab_size, 130000) - 10, (batch, max_len))
    ids[:, max_src_len - 2], ids[:, max_src_len - 1] = config.gmask_token_id, config.bos_token_id
    labels = ids.clone()
    labels[:, :max_src_len] = -100  # max_len - max_src_len answer tokens per row, as the estimate assumes
    loss = engine(input_ids=ids.to(device), labels=labels.to(device), logits_to_keep=1).loss  # as glmft.train
    engine.backward(loss)
    engine.step()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"peak": peak, "estimate": est.total_bytes(False) - est.context, "loss": loss.item(),
            "trainable": est.trainable}


def check_memory(plan: Plan) -> list[Row]:
    rows = []
    for method in ("lora",) if plan.smoke else ("lora", "pt"):
        start = time.perf_counter()
        if plan.device.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 26 * 2**30:
            rows.append(Row(f"memory {method} step", "skip", "needs about 25 GiB of GPU memory"))
            continue
        cmd = [sys.executable, __file__, "--case", f"memory:{method}", *(["--cpu-smoke"] if plan.smoke else [])]
        code, text = run_logged(cmd, plan.work / f"memory_{method}.log")
        seconds = time.perf_counter() - start
        if code:
            rows.append(Row(f"memory {method} step", "FAIL", report.last_error(text, code), seconds))
            continue
        found = json.loads(text.strip().splitlines()[-1])
        shape = "tiny shapes" if plan.smoke else "chatglm-6b shapes, b 2, len 768"
        if found["peak"] is None:
            rows.append(Row(f"memory {method} step ({shape})", verdict(math.isfinite(found["loss"])),
                            f"loss {found['loss']:.3f}; peak n/a on a CPU; estimate {found['estimate'] / 2**30:.3f} "
                            "GiB", seconds))
            continue
        ratio = found["peak"] / found["estimate"]
        rows.append(Row(f"memory {method} step ({shape})", verdict(ratio <= 1.1 and math.isfinite(found["loss"])),
                        f"peak {found['peak'] / 2**30:.2f} GiB, estimate {found['estimate'] / 2**30:.2f} GiB (no "
                        f"context allowance): peak/estimate {ratio:.2f}; {found['trainable']:,} trainable", seconds))
    return rows


# ---- generation speed -----------------------------------------------------------------------------------------
@torch.inference_mode()
def check_generation(plan: Plan) -> list[Row]:
    torch.manual_seed(0)
    config = ChatGLMConfig(**(SMOKE if plan.smoke else SMALL))
    dtype = torch.float32 if plan.smoke else torch.float16
    model = ChatGLMForConditionalGeneration(config).to(plan.device, dtype).eval()
    prompt, new = (16, 4) if plan.smoke else (64, 64)
    rows = []
    for batch in (1, 8):
        ids = torch.randint(10, min(config.vocab_size, 130000) - 10, (batch, prompt))
        ids[:, -2], ids[:, -1] = config.gmask_token_id, config.bos_token_id
        ids = ids.to(plan.device)
        kwargs = dict(do_sample=False, pad_token_id=config.pad_token_id, eos_token_id=None)
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        sync(plan)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        sync(plan)
        seconds = time.perf_counter() - start
        made = out.shape[1] - prompt
        rows.append(Row(f"greedy generation, batch {batch}", verdict(made == new),
                        f"{batch * made / seconds:,.1f} tokens/s ({prompt} prompt + {made} new tokens, "
                        f"{str(dtype).removeprefix('torch.')}, {config.num_layers} layers, hidden "
                        f"{config.hidden_size})", seconds))
    return rows


def sync(plan: Plan) -> None:
    if plan.device.type == "cuda":
        torch.cuda.synchronize()


# ---- the table ----------------------------------------------------------------------------------------------
def guarded(group: str, check: Callable[[], list[Row]]) -> list[Row]:
    """A check that raises becomes a FAIL row naming the exception; the other checks still run."""
    start = time.perf_counter()
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - any failure is a row of the table, not the end of the script
        return [Row(group, "FAIL", f"{type(err).__name__}: {err}"[:300], time.perf_counter() - start)]


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  status  {'s':>6}  detail", "-" * (width + 60)]
    lines += [f"{r.check:<{width}}  {r.status:<6}  {r.seconds:6.1f}  {r.detail}" for r in rows]
    return "\n".join(lines)


def environment(plan: Plan) -> str:
    if plan.device.type != "cuda":
        return f"CPU smoke run (tiny sizes; the numbers mean nothing), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}; "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups to run (default: all)")
    p.add_argument("--work_dir", default="", help="where runs and logs go (default: a temporary directory, kept "
                                                   "only when a check failed)")
    p.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                   help="developers: run the machinery on the CPU with tiny sizes (tests/test_gpu_check.py)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one memory case in this process
    args = p.parse_args()
    unknown = set(args.only.split(",")) - set(GROUPS)
    if unknown:
        p.error(f"--only: unknown groups {sorted(unknown)}; the groups are {', '.join(GROUPS)}")
    return args


def main() -> int:
    args = parse()
    if args.case:
        print(json.dumps(memory_case(args.case.partition(":")[2], args.cpu_smoke)))
        return 0
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built with CUDA {torch.version.cuda}): "
              "this script checks the GPU paths; run it on a machine with a CUDA GPU", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan(torch.device("cpu" if args.cpu_smoke else "cuda"), args.cpu_smoke, work)
    checks = {"logits": check_logits, "train": check_training, "quant": check_quant, "memory": check_memory,
              "generate": check_generation}
    start, rows = time.perf_counter(), []
    print(f"gpu_check: {environment(plan)}; runs and logs in {work}", flush=True)
    for group in [g for g in GROUPS if g in args.only.split(",")]:
        print(f"  {group} ...", flush=True)
        rows += guarded(group, lambda g=group: checks[g](plan))
    failed = [r for r in rows if r.status == "FAIL"]
    print("\n" + table(rows))
    kept = failed or args.work_dir
    if not kept:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed or skipped, {len(failed)} failed, in "
          f"{(time.perf_counter() - start) / 60:.1f} min{f'; logs in {work}' if kept else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
