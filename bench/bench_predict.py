"""Prediction throughput: records/s of the predict path at batch 1 and batch 8 on the tiny model.

    python bench/bench_predict.py                       # the 50 test records of ../shared/data/spo/spo_1.json
    python bench/bench_predict.py --test_path data/sample_test.jsonl --max_new_tokens 0

A script that prints numbers, not a test. It saves an (untrained) LoRA checkpoint of the tiny model in a temporary
directory and runs glmft.predict on it, exactly as predict_lora.py does, once per batch size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import chatglm  # noqa: E402
from glmft import checkpoint, predict  # noqa: E402
from glmft.args import TrainArgs  # noqa: E402
from glmft.train import meta_record  # noqa: E402
from glmft.tuners import lora  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--test_path", default=str(ROOT.parent / "shared" / "data" / "spo" / "spo_1.json"))
    p.add_argument("--max_new_tokens", type=int, default=64, help="0: the training default max_len - max_src_len")
    p.add_argument("--batch_sizes", default="1,8")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        method = lora.Args()
        model = lora.apply(chatglm.tiny()[0], method)
        checkpoint.save(model, Path(tmp) / "ckpt", meta_record(TrainArgs(), method, lora, {}, 0, 0), lora)
        results = {}
        for batch in map(int, args.batch_sizes.split(",")):
            settings = predict.PredictArgs(test_path=args.test_path, ckpt_dir=str(Path(tmp) / "ckpt"),
                                           output_dir=str(Path(tmp) / f"b{batch}"), batch_size=batch,
                                           max_new_tokens=args.max_new_tokens)
            results[batch] = predict.run(settings, lora)
    print(f"\n{torch.get_num_threads()} threads, max_new_tokens {args.max_new_tokens or 'from meta'}, "
          f"{results[batch]['n_records']} records of {args.test_path}")
    for batch, r in results.items():
        print(f"batch {batch:>2}: {r['records_per_s']:7.2f} records/s  ({r['test_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
