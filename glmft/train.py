"""The one DeepSpeed training loop every method runs through (the method only decides what trains)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import time
import types
from functools import partial
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from glmft import checkpoint
from glmft.args import TrainArgs
from glmft.data import SupervisedDataset, collate
from glmft.model import build_model, count_parameters, load_tokenizer, model_path, parameter_report
from glmft.monitor import Monitor, log, peak_memory_gb, setup_logging

# Values the script owns: a number written in ds_config.json for one of these would be a second home for it.
FILLED = {("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",), ("train_batch_size",),
          ("optimizer", "params", "lr"), ("optimizer", "params", "weight_decay"),
          ("scheduler", "params", "total_num_steps"), ("scheduler", "params", "warmup_num_steps"),
          ("scheduler", "params", "warmup_max_lr")}


ENGINE_DIR = "engine"  # inside a checkpoint: DeepSpeed's state and each rank's RNG, for --resume


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: training stops instead of learning from garbage."""


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group, or make a one-process group for ``python finetuning_x.py``."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def engine_config(train: TrainArgs, total_steps: int) -> dict:
    """ds_config.json with the values only the command line sets filled in (and CPU-safe precision)."""
    config = json.loads(Path(train.deepspeed_config).read_text())
    for path in FILLED:
        node = config
        for key in path[:-1]:
            node = node.get(key, {})
        if node.get(path[-1], "auto") != "auto":
            raise ValueError(f"{train.deepspeed_config}: {'.'.join(path)} is set there, but it comes from the "
                             "command line; write \"auto\" (or remove it) and use the script's option instead")
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = train.train_batch_size
    config["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    config.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"].update(
        lr=train.learning_rate, weight_decay=train.weight_decay)
    config.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})["params"].update(
        total_num_steps=total_steps, warmup_num_steps=max(1, int(train.warmup_ratio * total_steps)),
        warmup_max_lr=train.learning_rate)
    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator trains in fp32
        for kind in ("fp16", "bf16"):
            if config.get(kind, {}).get("enabled"):
                log.info("no CUDA device: %s disabled, training in fp32", kind)
                config[kind]["enabled"] = False
    return config


def train_dtype(config: dict) -> torch.dtype:
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32


def prepare_model(train: TrainArgs, method_args, tuner: types.ModuleType, dtype: torch.dtype, meta: bool = False):
    overrides = tuner.model_overrides(method_args) if hasattr(tuner, "model_overrides") else {}
    if train.quantization_bit:
        overrides["quantization_bit"] = train.quantization_bit
    model = tuner.apply(build_model(train.model_dir, dtype, overrides, meta=meta), method_args)
    return model, overrides


def meta_record(train: TrainArgs, method_args, tuner, overrides: dict, step: int, epoch: int) -> dict:
    model_dir = train.model_dir if train.model_dir == "tiny" else str(model_path(train.model_dir).resolve())
    keep = ("train_path", "max_len", "max_src_len", "prompt_text", "seed", "learning_rate")
    return {"method": tuner.NAME, "method_args": dataclasses.asdict(method_args), "model_overrides": overrides,
            "base_model": model_dir, "data": {k: getattr(train, k) for k in keep}, "step": step, "epoch": epoch,
            "description": tuner.describe(method_args)}


def dry_run(train: TrainArgs, method_args, tuner: types.ModuleType) -> None:
    setup_logging(0)
    model, _ = prepare_model(train, method_args, tuner, torch.float16, meta=True)
    print(f"{tuner.describe(method_args)} on {train.model_dir} (meta device, no weights loaded)")
    print(parameter_report(model))


def save_checkpoint(engine, train, method_args, tuner, overrides, step: int, position: dict) -> None:
    """Every rank writes its engine shard and RNG state into the staging dir; rank 0 adds weights + meta and
    publishes it under its final name once all are done."""
    staging = checkpoint.staging_dir(train.output_dir, step)
    if dist.get_rank() == 0:
        staging.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(staging / ENGINE_DIR), tag="state", client_state=position,
                           exclude_frozen_parameters=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(rng, staging / ENGINE_DIR / f"rng_rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        checkpoint.write_weights(engine.module, staging, tuner)
        checkpoint.write_meta(staging, meta_record(train, method_args, tuner, overrides, step, position["epoch"]))
        log.info("saved %s", checkpoint.publish(staging))
    dist.barrier()


def resume_state(engine, train: TrainArgs) -> dict:
    found = checkpoint.latest(train.output_dir)
    if found is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {train.output_dir}")
    _, position = engine.load_checkpoint(str(found / ENGINE_DIR), tag="state", load_module_strict=False)
    rng = torch.load(found / ENGINE_DIR / f"rng_rank{dist.get_rank()}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", found, position["step"], position["epoch"],
             position["batch"])
    return position


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(train: TrainArgs, method_args, tuner: types.ModuleType) -> Path | None:
    """Train with ``tuner`` and return the final checkpoint directory (None for a dry run)."""
    if train.dry_run:
        dry_run(train, method_args, tuner)
        return None
    rank, world = init_distributed()
    setup_logging(rank)
    seed_everything(train.seed)
    tokenizer = load_tokenizer(train.model_dir)
    dataset = SupervisedDataset(train.train_path, tokenizer, train.max_len, train.max_src_len, train.prompt_text)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=train.seed)
    # A private generator: creating a loader iterator must not draw from the global RNG, or a resumed run's
    # dropout masks would differ from an uninterrupted one's.
    loader = DataLoader(dataset, batch_size=train.train_batch_size, sampler=sampler,
                        collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(train.seed))
    steps_per_epoch = len(loader) // train.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{train.train_path}: {len(dataset)} records give no full optimizer step with batch "
                         f"{train.train_batch_size} x accumulation {train.gradient_accumulation_steps} x {world} ranks")
    total = train.max_steps or steps_per_epoch * train.num_train_epochs
    config = engine_config(train, total)
    model, overrides = prepare_model(train, method_args, tuner, train_dtype(config))
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    log.info("%s | %s | dtype %s | world %d | effective batch %d | %d steps | %s", tuner.describe(method_args),
             train.model_dir, train_dtype(config), world,
             train.train_batch_size * train.gradient_accumulation_steps * world, total, dataset.summary())
    log.info("%s", parameter_report(model))
    position = resume_state(engine, train) if train.resume else {"step": 0, "epoch": 0, "batch": 0}
    trainable, all_params = count_parameters(model)
    info = {"method": tuner.NAME, "description": tuner.describe(method_args), "trainable_params": trainable,
            "all_params": all_params, "dtype": str(train_dtype(config)), "world_size": world}
    loop(engine, loader, sampler, dataset, train, total, position,
         save=partial(save_checkpoint, engine, train, method_args, tuner, overrides), info=info)
    return checkpoint.latest(train.output_dir)


def loop(engine, loader, sampler, dataset, train: TrainArgs, total: int, position: dict, save, info: dict):
    """Micro-batches through DeepSpeed (it accumulates, clips, scales and steps); log and save on optimizer steps."""
    step, epoch, skip = position["step"], position["epoch"], position["batch"]
    board = Path(train.tensorboard_dir or Path(train.output_dir) / "runs") / (train.run_name or info["method"])
    monitor = Monitor(dist.get_rank(), board, total, step)
    window = torch.zeros(3, dtype=torch.float64)  # loss sum, micro-batches, real tokens since the last log
    seen = torch.zeros(2, dtype=torch.float64)  # samples and real tokens trained on by this run (all ranks)
    tick = time.perf_counter()
    while step < total and (train.max_steps or epoch < train.num_train_epochs):
        sampler.set_epoch(epoch)
        for batch_index, batch in enumerate(loader):
            if batch_index < skip:
                continue  # resuming: these micro-batches were trained before the checkpoint
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch, logits_to_keep=1).loss
            # Every rank learns of a non-finite loss on any rank, so all stop together (none hangs in a collective).
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                lines = [dataset.records[i].line for i in list(sampler)[batch_index * train.train_batch_size:][
                    : train.train_batch_size]]
                raise NonFiniteLoss(
                    f"loss is {loss.item()} on rank {dist.get_rank()} (non-finite on at least one rank) at step "
                    f"{step + 1} (epoch {epoch}, batch {batch_index}, this rank's records on lines "
                    f"{lines} of {train.train_path}). The run diverged: lower --learning_rate (now "
                    f"{train.learning_rate:g}); under fp16, activations may overflow: try bf16 in "
                    f"{train.deepspeed_config}. Nothing was saved from this step.")
            engine.backward(loss)
            before = engine.global_steps
            engine.step()
            tokens = batch["attention_mask"].sum().item()
            window += torch.tensor([loss.item(), 1.0, tokens], dtype=torch.float64)
            seen += torch.tensor([batch["input_ids"].shape[0], tokens], dtype=torch.float64)
            if engine.global_steps == before:
                continue
            step += 1
            scalars = None
            if step % train.log_steps == 0 or step == total:
                dist.all_reduce(window)
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                grad_norm = engine.get_global_grad_norm()
                scalars = {"train/loss": window[0].item() / window[1].item(), "train/lr": engine.get_lr()[0],
                           "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                           "train/tokens_per_s": window[2].item() / elapsed, "train/peak_mem_gb": peak_memory_gb()}
                window.zero_()
            monitor.step(step, scalars)
            done = step >= total
            if done or (train.save_steps and step % train.save_steps == 0):
                save(step, {"step": step, "epoch": epoch, "batch": batch_index + 1})
            if done:
                break
        epoch, skip = epoch + 1, 0
    dist.all_reduce(seen)
    wall = time.perf_counter() - monitor.start
    monitor.close(Path(train.output_dir) / "train_summary.json",
                  {**info, "steps": step, "samples": int(seen[0]), "tokens": int(seen[1]),
                   "samples_per_s": seen[0].item() / wall, "tokens_per_s": seen[1].item() / wall})
