"""What one rank really holds under ZeRO-1/2/3, measured on a DeepSpeed engine, against glmft.estimate's terms.

    deepspeed --num_gpus 2 bench/zero_partition.py                    # two CPU ranks (gloo), or two GPUs
    deepspeed --num_gpus 2 bench/zero_partition.py --method pt --json out.json

A script that prints numbers, not a test (tests/test_compare.py runs it once). For each stage it builds the tiny
model with one method applied, takes one training step through ``deepspeed.initialize`` and counts, on every rank,
the elements of: the optimizer's master copy (its partition of the flat fp32 group), Adam's m and v, the gradients
at their peak (stage 1: every full ``.grad``, held until DeepSpeed reduces them after backward; stages 2 and 3:
the partition this rank keeps, ``averaged_gradients`` / the flat partition buffer; the reduce buckets are not
counted) and the parameters (ZeRO-3: its partitions, plus the parameters of at most
``stage3_param_persistence_threshold`` elements, which stay gathered once gathered). The prediction is
``glmft.estimate.rank_elements``; a measured count may exceed it by DeepSpeed's alignment padding (at most ``2 * N``
elements per flat group, or per parameter under ZeRO-3). Elements, not bytes: on the CPU the engine trains in fp32,
on a GPU the gradients and weights are fp16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("master", "moments", "grads", "weights")


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors if t is not None)


def count_stage1_grads(optimizer, trainable: list, held: dict) -> None:
    """ZeRO-1 keeps every full ``.grad`` until ``reduce_gradients`` partitions them: count them on entry."""
    reduce = optimizer.reduce_gradients

    def counting(*args, **kwargs):
        held["grads"] = numel(p.grad for p in trainable)
        return reduce(*args, **kwargs)

    optimizer.reduce_gradients = counting


def measure(engine, optimizer, stage: int, held: dict) -> None:
    """Element counts this rank holds, read from DeepSpeed's optimizer after backward and before the step (the
    ZeRO-3 weights after it)."""
    params = list(engine.module.parameters())
    if stage == 3:
        held["master"] = numel(optimizer.fp32_partitioned_groups_flat)
        held["grads"] = numel([optimizer.grad_partitions_flat_buffer])
        return
    held["master"] = numel(optimizer.single_partition_of_fp32_groups)
    if stage == 2:
        held["grads"] = numel(t for group in optimizer.averaged_gradients.values() for t in group or [])
    held["weights"] = sum(p.numel() for p in params)


def one_stage(method: str, stage: int, persistence: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    from glmft import estimate
    from glmft.model import build_model
    from glmft.tuners import TUNERS

    tuner = TUNERS[method]
    args = tuner.Args(**({"num_trainable_layers": 1} if method == "freeze" else {}))
    overrides = tuner.model_overrides(args) if hasattr(tuner, "model_overrides") else {}
    torch.manual_seed(0)
    model = tuner.apply(build_model("tiny", torch.float32, overrides), args).train()
    sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": persistence},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, optimizer, *_ = deepspeed.initialize(model=model, config=config,
                                                 model_parameters=[p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(5, 1000, (1, 24))
    ids[0, 10], ids[0, 11] = model.config.gmask_token_id, model.config.bos_token_id  # the layout data gives
    held: dict[str, int] = {}
    if stage == 1:
        count_stage1_grads(optimizer, [p for p in model.parameters() if p.requires_grad], held)
    engine.backward(engine(input_ids=ids.to(engine.device), labels=ids.to(engine.device)).loss)
    measure(engine, optimizer, stage, held)
    engine.step()  # Adam's m and v exist from the first step on; the wrapped torch AdamW holds this rank's part
    held["moments"] = numel(t for s in optimizer.optimizer.state.values() for t in s.values()
                            if torch.is_tensor(t) and t.dim() > 0)
    if stage == 3:  # after the step: its partitions, plus the persistent (small) parameters, gathered from then on
        held["weights"] = sum(p.ds_tensor.numel() + p.data.numel() for p in engine.module.parameters())
    world = dist.get_world_size()
    setting = estimate.Setting(1, 24, 12, stage, world, persistence=persistence)
    predicted = estimate.rank_elements(sizes, setting)
    return {"method": method, "stage": stage, "rank": dist.get_rank(), "world": world,
            "trainable": sum(n for n, t in sizes if t), "total": sum(n for n, _ in sizes),
            "measured": held, "predicted": {k: round(v) for k, v in predicted.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--method", default="lora", choices=["freeze", "embedding", "pt", "lora"])
    p.add_argument("--stages", default="1,2,3", help="comma-separated ZeRO stages")
    p.add_argument("--persistence", type=int, default=0,
                   help="stage3_param_persistence_threshold (DeepSpeed's default 1e5 keeps every tiny tensor whole)")
    p.add_argument("--json", default="", help="also write every rank's rows here")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args()

    import torch.distributed as dist

    from glmft.train import init_distributed

    init_distributed()  # the training scripts' own: the right backend, and no leaked /dev/shm segment on the CPU
    rows = []
    for stage in map(int, args.stages.split(",")):
        mine = one_stage(args.method, stage, args.persistence)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        rows += gathered
    if dist.get_rank() == 0:
        print(f"{args.method} on the tiny model, {rows[0]['world']} ranks; elements per rank, measured / predicted")
        print(f"{'stage':>5} {'rank':>4} " + " ".join(f"{k:>17}" for k in KINDS))
        for row in rows:
            cells = [f"{row['measured'][k]:>8}/{row['predicted'][k]:<8}" for k in KINDS]
            print(f"{row['stage']:>5} {row['rank']:>4} " + " ".join(cells))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
