"""One logging voice: rank 0 only; a progress bar, TensorBoard scalars with fixed names, a run header."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("glmft")


def setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    for noisy in ("DeepSpeed", "deepspeed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def peak_memory_gb() -> float:
    """GPU: peak allocated by torch on this device; CPU: peak resident set of this process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class Monitor:
    """Progress bar and TensorBoard writer on rank 0; a no-op elsewhere."""

    def __init__(self, rank: int, log_dir: Path, total_steps: int, start_step: int):
        self.active = rank == 0
        self.history: list[dict[str, float]] = []  # every logged point, for train_summary.json
        self.bar = None
        self.writer = None
        self.start = time.perf_counter()
        if self.active:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, scalars: dict[str, float] | None) -> None:
        """Advance the bar by one optimizer step; with scalars, also write them (names like ``train/loss``)."""
        if not self.active:
            return
        self.bar.update(1)
        if scalars:
            wall = time.perf_counter() - self.start
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.add_scalar("train/wall_s", wall, step)
            self.history.append({"step": step, "wall_s": wall, **scalars})
            self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}",
                                 tok_s=f"{scalars['train/tokens_per_s']:.0f}")

    def close(self, path: Path | None = None, extra: dict | None = None) -> None:
        """Close the bar and writer; with ``path``, also write the run's summary (what compare.py reads)."""
        if not self.active:
            return
        self.bar.close()
        self.writer.close()
        if path is not None and self.history:
            losses = [h["train/loss"] for h in self.history]
            summary = {**(extra or {}), "wall_seconds": time.perf_counter() - self.start, "final_loss": losses[-1],
                       "best_loss": min(losses), "peak_mem_gb": max(h["train/peak_mem_gb"] for h in self.history),
                       "history": self.history}
            path.write_text(json.dumps(summary, indent=2) + "\n")
