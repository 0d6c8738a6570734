"""The one DeepSpeed training loop every method runs through (the method only decides what trains)."""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import random
import socket
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from glmft import checkpoint, evaluate, families, optim, rundir, snapshot
from glmft.args import TrainArgs
from glmft.data import SupervisedDataset, collate
from glmft.health import Health
from glmft.model import build_model, count_parameters, load_tokenizer, model_path, parameter_report
from glmft.monitor import Meter, Monitor, log, peak_memory_gb, setup_logging

# Values the script owns: a number written in ds_config.json for one of these would be a second home for it.
FILLED = {("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",), ("train_batch_size",),
          ("optimizer", "params", "lr"), ("optimizer", "params", "weight_decay"),
          ("scheduler", "params", "total_num_steps"), ("scheduler", "params", "warmup_num_steps"),
          ("scheduler", "params", "warmup_max_lr")}


ENGINE_DIR = checkpoint.ENGINE_DIR  # inside a checkpoint: DeepSpeed's state and each rank's RNG, for --resume
# meta.json's record of how the weights were trained: --resume refuses a checkpoint that differs in any of them
DATA_FIELDS = ("train_path", "max_len", "max_src_len", "prompt_text", "seed", "learning_rate", "task", "input_key",
               "target_key", "labels")
SCHEDULE_FIELDS = ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_ratio",
                   "weight_decay", "quantization_bit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(attempts: int = 5) -> tuple[int, int]:
    """Join the launcher's process group, or make a one-process group for ``python finetuning_x.py``.

    A free port found by binding port 0 is released before the rendezvous binds it again, so two plain runs started
    at the same moment can be handed the same one (EADDRINUSE): the one that loses tries another port."""
    if dist.is_initialized():  # a group made by the caller (in-process use): its environment is not ours to change
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        deepspeed.init_distributed(dist_backend=backend)
    else:
        for attempt in range(attempts):
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
            try:
                deepspeed.init_distributed(dist_backend=backend)
                break
            except dist.DistNetworkError:
                if attempt + 1 == attempts:
                    raise
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        atexit.register(remove_shm_buffer, shm_buffer_path())
    return dist.get_rank(), dist.get_world_size()


def shm_buffer_path() -> Path:
    """The shared-memory segment DeepSpeed's CPU backend creates for this rank when the launcher started it.

    Its shm allreduce op (ops/csrc/cpu/comm/shm.cpp, loaded when every rank is local, i.e. LOCAL_SIZE equals the world
    size) creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MiB) and never
    unlinks it: each CPU launch through ``deepspeed`` would leave RAM behind until the machine reboots."""
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}"
    return Path("/dev/shm") / f"{name}_{env.get('RANK', '0')}"


def remove_shm_buffer(path: Path) -> None:
    """At exit, when the peers have long opened it (they map it while the group starts): only the name goes."""
    path.unlink(missing_ok=True)


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
    overrides = tuner.model_overrides(method_args)
    if train.quantization_bit:
        overrides["quantization_bit"] = train.quantization_bit
    model = tuner.apply(build_model(train.model_dir, dtype, overrides, meta=meta), method_args)
    return model, overrides


def run_identity(train: TrainArgs, method_args, tuner, world: int = 1, zero_stage: int = 0) -> dict:
    """What makes two training segments one run (``--resume`` compares it with the checkpoint's meta.json)."""
    model_dir = train.model_dir if train.model_dir in ("tiny", "mini") else str(model_path(train.model_dir).resolve())
    return {"method": tuner.NAME, "method_args": dataclasses.asdict(method_args), "base_model": model_dir,
            "data": {k: getattr(train, k) for k in DATA_FIELDS},
            "training": {**{k: getattr(train, k) for k in SCHEDULE_FIELDS}, "world_size": world,
                         "zero_stage": zero_stage}}


def meta_record(train: TrainArgs, method_args, tuner, overrides: dict, step: int, epoch: int, world: int = 1,
                zero_stage: int = 0, loss: float | None = None, dtype: str = "float32") -> dict:
    """meta.json: the run's identity, the model overrides, the step, the training ``dtype`` (predict's default on a
    GPU) and ``loss`` (the last logged training loss, which ``--save_total_limit`` keeps the best checkpoint by)."""
    return {**run_identity(train, method_args, tuner, world, zero_stage), "model_overrides": overrides,
            "step": step, "epoch": epoch, "description": tuner.describe(method_args), "dtype": dtype, "loss": loss}


def engine_dtype(engine) -> str:
    """The precision the engine trains in, as meta.json records it."""
    return "float16" if engine.fp16_enabled() else "bfloat16" if engine.bfloat16_enabled() else "float32"


def dry_run(train: TrainArgs, method_args, tuner: types.ModuleType) -> None:
    """Build on the meta device and print the parameter table. The step count needs the data, so a method's
    ``for_run`` gets ``--max_steps`` (0 when not given: a method then keeps its own placeholder)."""
    setup_logging(0)
    method_args = tuner.for_run(method_args, train.max_steps)
    model, _ = prepare_model(train, method_args, tuner, torch.float16, meta=True)
    print(f"{tuner.describe(method_args)} on {train.model_dir} (meta device, no weights loaded)")
    print(parameter_report(model))


def save_checkpoint(engine, train, method_args, tuner, overrides, step: int, position: dict,
                    keep: Path | None = None) -> None:
    """Checkpoint ``step`` (every rank calls this); ``keep``: the checkpoint this run resumed from, which
    ``--save_total_limit`` must not delete."""
    history = (position.get("summary") or {}).get("history") or [{}]
    loss = history[-1].get("train/loss")
    meta = meta_record(train, method_args, tuner, overrides, step, position["epoch"], dist.get_world_size(),
                       engine.zero_optimization_stage(), loss if loss is None or math.isfinite(loss) else None,
                       engine_dtype(engine))
    meta.update({k: position[k] for k in ("eval", "best_by") if k in position})  # this step's evaluation
    snapshot.save(engine, train.output_dir, step, position, tuner, meta, train.save_total_limit,
                  (keep,) if keep else ())


def resume_state(engine, found: Path, tuner: types.ModuleType) -> dict:
    """Continue from checkpoint ``found`` (checked by rundir.check_resume): engine state, data position, RNGs and the
    method's running state."""
    return snapshot.restore(engine, found, tuner)


def read_data(path: str, tokenizer, train: TrainArgs) -> SupervisedDataset:
    """A data file encoded as training encodes it: the training records and the eval records alike."""
    return SupervisedDataset(path, tokenizer, train.max_len, train.max_src_len, train.prompt_text, train.task,
                             train.input_key, train.target_key)


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
    with rundir.claim(train, tuner.NAME):  # rank 0 holds the output directory's lock until the run ends
        return train_run(train, method_args, tuner, rank, world)


def train_run(train: TrainArgs, method_args, tuner: types.ModuleType, rank: int, world: int) -> Path | None:
    """The run itself, its output directory claimed."""
    seed_everything(train.seed)
    tokenizer = load_tokenizer(train.model_dir)
    dataset = read_data(train.train_path, tokenizer, train)
    eval_set = read_data(train.eval_path, tokenizer, train) if train.eval_path else None  # bad lines fail here, early
    task = evaluate.task_of(train)
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
    method_args = tuner.for_run(method_args, total)  # e.g. AdaLoRA's schedule spans the run; meta.json records it
    config = engine_config(train, total)
    resumed = None
    if train.resume:  # before the model is built: a mismatch fails in seconds, naming the differing options
        stage = config.get("zero_optimization", {}).get("stage", 0)
        resumed = rundir.check_resume(train.output_dir, run_identity(train, method_args, tuner, world, stage))
    model, overrides = prepare_model(train, method_args, tuner, train_dtype(config))
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    groups = optim.param_groups(model, train.weight_decay)
    decay = optim.describe(groups, train.weight_decay)  # before initialize: ZeRO flattens the groups' tensors in place
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    log.info("%s | %s | dtype %s | world %d | effective batch %d | %d steps | %s | %s", tuner.describe(method_args),
             train.model_dir, train_dtype(config), world,
             train.train_batch_size * train.gradient_accumulation_steps * world, total, decay,
             dataset.summary())
    log.info("%s", parameter_report(model))
    position = resume_state(engine, resumed, tuner) if resumed else {"step": 0, "epoch": 0, "batch": 0}
    trainable, all_params = count_parameters(model)
    info = {"method": tuner.NAME, "description": tuner.describe(method_args), "trainable_params": trainable,
            "all_params": all_params, "dtype": str(train_dtype(config)), "world_size": world}
    evaluator = None if eval_set is None else evaluate.build(
        engine, train, (dataset, eval_set), tokenizer, task, (position.get("summary") or {}).get("eval_history", ()))
    loop(engine, loader, sampler, dataset, train, total, position,
         save=partial(save_checkpoint, engine, train, method_args, tuner, overrides, keep=resumed), info=info,
         evaluator=evaluator, loss_kwargs=families.of_model(model).LOSS_KWARGS, on_step=tuner.on_step)
    final = checkpoint.latest(train.output_dir)
    if rank == 0 and final is not None:
        log.info("done: %s, %s", final, rundir.size_text(final))
    return final


def loop(engine, loader, sampler, dataset, train: TrainArgs, total: int, position: dict, save, info: dict,
         evaluator: evaluate.Evaluator | None = None, loss_kwargs: dict | None = None,
         on_step: Callable[[torch.nn.Module, int], None] | None = None) -> None:
    """Micro-batches through DeepSpeed (it accumulates, clips, scales and steps); log, evaluate (every rank) and save
    on optimizer steps. With --save_best, an evaluation that improves on the best is saved too. ``loss_kwargs``: the
    model family's extra forward arguments with labels (glmft.families, ``LOSS_KWARGS``); ``on_step``: the tuner's
    hook, called with the module and the step about to be taken once its gradients exist, before ``engine.step()``
    zeroes them (every rank calls it).

    Losses and token counts stay on ``engine.device`` (every tensor handed to a collective lives there, as NCCL
    requires). The host reads them once per optimizer step (the divergence check) and at log and save steps, so the
    device is never stalled per micro-batch."""
    step, epoch, skip = position["step"], position["epoch"], position["batch"]
    earlier = position.get("summary")  # the run so far, when resuming
    board = Path(train.tensorboard_dir or Path(train.output_dir) / "runs") / (train.run_name or info["method"])
    monitor = Monitor(dist.get_rank(), board, total, step, earlier)
    meter, health = Meter(engine.device), Health(engine, train, earlier and earlier.get("health"))
    size, tick = train.train_batch_size, time.perf_counter()
    loss_kwargs = loss_kwargs or {}
    while step < total and (train.max_steps or epoch < train.num_train_epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)  # this rank's record indices in this epoch's order, to name a bad batch's lines
        for batch_index, batch in enumerate(loader):
            if batch_index < skip:
                continue  # resuming: these micro-batches were trained before the checkpoint
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch, **loss_kwargs).loss
            health.record(loss, [dataset.records[i].line for i in order[batch_index * size:][:size]])
            meter.add(loss, batch)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():  # checked before step(): a NaN never reaches the weights
                health.check_losses(step + 1, f"epoch {epoch}, batch {batch_index}")
                if on_step is not None:
                    on_step(engine.module, step + 1)
            before = engine.global_steps
            engine.step()
            if engine.global_steps == before:
                continue
            step += 1
            health.stepped(step)
            scalars = None
            if step % train.log_steps == 0 or step == total:
                scalars, tick = log_scalars(engine, meter, tick), time.perf_counter()
            monitor.step(step, scalars)
            done = step >= total
            saving = done or bool(train.save_steps and step % train.save_steps == 0)
            if evaluator is not None and evaluator.due(step, saving):
                monitor.evaluated(step, evaluator())
                saving = saving or evaluator.save_now()
            if saving:
                health.settle(step)
                summary = monitor.snapshot(*meter.totals(), health=health.state())
                save(step, {"step": step, "epoch": epoch, "batch": batch_index + 1, "summary": summary,
                            **(evaluator.fields() if evaluator is not None else {})})
            if done:
                break
        epoch, skip = epoch + 1, 0
    health.settle(step)
    best = rundir.best_record(train.output_dir) if dist.get_rank() == 0 else {}
    monitor.close(Path(train.output_dir) / "train_summary.json", {**info, "steps": step, **health.summary(), **best},
                  *meter.totals())


def log_scalars(engine, meter: Meter, tick: float) -> dict[str, float]:
    """The TensorBoard scalars of a log step (the window since the last one, all ranks): one collective, one read."""
    norm = engine.get_global_grad_norm()
    loss, tokens, device_norm = meter.read_window(norm if torch.is_tensor(norm) else None)
    norm = device_norm if torch.is_tensor(norm) else norm
    return {"train/loss": loss, "train/lr": engine.get_lr()[0],
            "train/grad_norm": float(norm) if norm is not None else 0.0,
            "train/tokens_per_s": tokens / (time.perf_counter() - tick), "train/peak_mem_gb": peak_memory_gb()}
