"""d2q scores on the test documents that the training file does not contain, from a compare.py output directory.

    python bench/d2q_unseen.py results/mini-d2q   # --train / --test: the d2q files (default: ../shared/data/d2q)

6 of d2q_1's 20 documents also occur in d2q_0 (with other questions); ../shared/data/d2q/README.md asks for results
on the 14 unseen ones as well. This averages each run's per-record scores (predictions.jsonl, written by predict)
over those records: the same metric as the report's, on the unseen subset. A script that prints numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("rouge-l", "rouge-1", "rouge-2", "bleu-4")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("output_dir", type=Path, help="a compare.py --task generation output directory")
    parser.add_argument("--train", default="../shared/data/d2q/d2q_0.json")
    parser.add_argument("--test", default="../shared/data/d2q/d2q_1.json")
    args = parser.parse_args()
    train = {r["input"] for r in read_jsonl(Path(args.train))}
    seen = {number for number, r in enumerate(read_jsonl(Path(args.test)), start=1) if r["input"] in train}
    print(f"test lines whose document is in {args.train}: {sorted(seen)}")
    print("| run | records | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
    for result in sorted(args.output_dir.glob("*/seed*/result.json")):
        rows = read_jsonl(result.parent / "predict" / "predictions.jsonl")
        unseen = [r["scores"] for r in rows if r["line"] not in seen]
        if not unseen:
            raise SystemExit(f"{result.parent}: no prediction outside the training documents")
        means = [sum(s[k] for s in unseen) / len(unseen) for k in METRICS]
        print(f"| {result.parent.parent.name} | {len(unseen)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")


if __name__ == "__main__":
    main()
