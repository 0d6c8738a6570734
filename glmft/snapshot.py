"""A training checkpoint, written by every rank together and read back by ``--resume``.

Each rank writes its share of DeepSpeed's state (optimizer, scheduler, trainable tensors) and its RNG states into
``engine/`` of a staging directory; the trainable weights are gathered (a collective under ZeRO-3); rank 0 writes
them with ``meta.json``, renames the directory into place and prunes older checkpoints (``--save_total_limit``).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from glmft import checkpoint, rundir
from glmft.checkpoint import ENGINE_DIR
from glmft.monitor import log


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from this rank's device generator, not the CPU one
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, source: Path) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if not torch.cuda.is_available():
        return
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    else:
        log.warning("%s holds no CUDA RNG state (saved without CUDA, or by an older version): dropout from here on "
                    "differs from an uninterrupted run's", source)


def trainable_engine_state(engine) -> None:
    """Make ``engine`` save only the trainable tensors of its module.

    ``exclude_frozen_parameters=True`` drops frozen tensors by their ``named_parameters()`` names, which list a tied
    tensor once: ChatGLM's frozen output layer (the word embedding again, as ``lm_head.weight``: 535M values on
    chatglm-6b) stayed in every ``engine/``, with the buffers. The frozen ones come from the base model on resume
    (DeepSpeed loads this state with ``strict=False``).
    """
    if getattr(engine, "_glmft_trainable_only", False):
        return
    keep = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if p.requires_grad}
    full = engine.module_state_dict

    def trainable_only(*args, **kwargs):
        state = full(*args, **kwargs)
        for name in [n for n in state if n not in keep]:
            del state[name]
        return state

    engine.module_state_dict = trainable_only
    engine._glmft_trainable_only = True


def save(engine, output_dir: str | Path, step: int, position: dict, tuner, meta: dict, limit: int = 0,
         keep: tuple[Path, ...] = ()) -> Path:
    """Write checkpoint ``step`` (every rank calls this) and return its path; ``position`` goes into the engine
    state for ``--resume``, ``limit``/``keep`` are :func:`glmft.rundir.prune`'s."""
    rank = dist.get_rank()
    staging = checkpoint.staging_dir(output_dir, step)
    if rank == 0:
        checkpoint.stage(staging)  # before the barrier: no rank writes into what a killed run left
    dist.barrier()
    trainable_engine_state(engine)
    with checkpoint.writing(staging / ENGINE_DIR):
        engine.save_checkpoint(str(staging / ENGINE_DIR), tag="state", client_state=position,
                               exclude_frozen_parameters=True)
    rng_file = staging / ENGINE_DIR / f"rng_rank{rank}.pt"
    with checkpoint.writing(rng_file):  # this rank's RNGs and the method's own running state (tuner.state)
        torch.save({**rng_state(), "tuner": tuner.state(engine.module)}, rng_file)
    state = checkpoint.trainable_state(engine.module, keep=rank == 0)  # a collective under ZeRO-3
    dist.barrier()
    final = staging.with_name(f"checkpoint-{step}")
    if rank == 0:
        checkpoint.write_weights(engine.module, staging, tuner, state)
        checkpoint.write_meta(staging, meta)
        checkpoint.publish(staging, final)
        removed = rundir.prune(output_dir, limit, {final, *keep})
        log.info("saved %s, %s%s", final, rundir.size_text(final),
                 f"; deleted {', '.join(p.name for p in removed)} (--save_total_limit {limit})" if removed else "")
    dist.barrier()
    return final


def restore(engine, ckpt: Path, tuner) -> dict:
    """Load checkpoint ``ckpt`` into ``engine``, this rank's RNGs and the method's running state (``tuner.load_state``);
    returns the data position saved with it."""
    rng_file = ckpt / ENGINE_DIR / f"rng_rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: {ckpt} was written by fewer ranks than this run has")
    _, position = engine.load_checkpoint(str(ckpt / ENGINE_DIR), tag="state", load_module_strict=False)
    if position is None:
        raise FileNotFoundError(f"{ckpt / ENGINE_DIR}: DeepSpeed found no engine state to resume from")
    saved = torch.load(rng_file, weights_only=False)
    restore_rng(saved, rng_file)
    tuner.load_state(engine.module, saved.get("tuner", {}))
    log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, position["step"], position["epoch"],
             position["batch"])
    return position
