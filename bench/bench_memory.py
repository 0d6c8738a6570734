"""Memory of one training step on a float vs INT8 vs INT4 base: LoRA and P-Tuning, batch 2 x seq 512, CPU.

    python bench/bench_memory.py                     # the bundled tiny model
    python bench/bench_memory.py --model small       # 4 layers, hidden 512, vocab 130528: weights that show

A script that prints numbers, not a test. Every (method, bits) case runs in a fresh process so that its peak
resident set is its own: "weights" is the bytes of the model's tensors, "step" the growth of the peak resident set
over the loaded model during forward + backward + AdamW step, "peak" the process's peak resident set. For the
real chatglm-6b on a GPU see ``python compare.py --dry_run`` (the analytic estimate).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_case(model_name: str, method: str, bits: int, seq: int) -> dict:
    import torch

    import chatglm
    from chatglm.quantization import quantize_model
    from glmft.tuners import TUNERS

    torch.manual_seed(0)
    tuner = TUNERS[method]
    args = tuner.Args(**({"pre_seq_len": 16} if method == "pt" else {}))
    overrides = tuner.model_overrides(args) if hasattr(tuner, "model_overrides") else {}
    if model_name == "tiny":
        model = chatglm.ChatGLMForConditionalGeneration.from_pretrained(chatglm.TINY_DIR, **overrides)
    else:
        config = chatglm.ChatGLMConfig(num_layers=4, hidden_size=512, num_attention_heads=8, inner_hidden_size=2048,
                                       **overrides)
        model = chatglm.ChatGLMForConditionalGeneration(config)
    if bits:
        quantize_model(model, bits)
    model = tuner.apply(model, args).train()
    cfg = chatglm.ChatGLMConfig.from_dict(model.config.to_dict())
    ids = torch.randint(10, min(cfg.mask_token_id, 1000), (2, seq))
    ids[:, seq // 2 - 2], ids[:, seq // 2 - 1] = cfg.gmask_token_id, cfg.bos_token_id
    labels = ids.clone()
    labels[:, : seq // 2 - 1] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaded = rss_mb()
    model(ids, labels=labels, logits_to_keep=1).loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "bits": bits, "weights_mb": weights / 2**20, "step_mb": peak - max(before, loaded),
            "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", choices=["tiny", "small"], default="tiny")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.case:
        method, bits = args.case.split(":")
        print(json.dumps(one_case(args.model, method, int(bits), args.seq)))
        return
    print(f"model {args.model}, batch 2 x seq {args.seq}, fp32 activations, CPU (peak resident set, MiB)")
    print(f"{'method':<6} {'base':<6} {'weights':>9} {'step':>9} {'peak':>9}")
    for method in ("lora", "pt"):
        for bits in (0, 8, 4):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--seq", str(args.seq), "--case",
                                  f"{method}:{bits}"], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = f"int{bits}" if bits else "fp32"
            print(f"{method:<6} {base:<6} {r['weights_mb']:9.2f} {r['step_mb']:9.1f} {r['peak_mb']:9.1f}")


if __name__ == "__main__":
    main()
