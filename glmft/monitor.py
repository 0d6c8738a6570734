"""One logging voice: rank 0 only; a progress bar, TensorBoard scalars with fixed names, a run header."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
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


class Meter:
    """Loss and token counts kept on the device: adding a micro-batch costs no host sync; they are read (all ranks
    summed) only at log and save steps."""

    def __init__(self, device: torch.device):
        self.window = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, real tokens since the last log
        self.micro = 0  # micro-batches since the last log, on this rank (every rank runs as many)
        self.seen = torch.zeros(2, dtype=torch.float64, device=device)  # samples, real tokens in this segment

    def add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        tokens = batch["attention_mask"].sum()
        self.window += torch.stack((loss.detach().double(), tokens.double()))
        self.seen[0] += batch["input_ids"].shape[0]
        self.seen[1] += tokens
        self.micro += 1

    def read_window(self, extra: torch.Tensor | None = None) -> tuple[float, float, float | None]:
        """(mean loss, tokens) over all ranks since the last call, and ``extra`` (a device scalar such as the grad
        norm) read in the same host sync."""
        window = self.window.clone()
        dist.all_reduce(window)
        if extra is not None:
            window = torch.cat((window, extra.detach().reshape(1).to(window)))
        values = window.tolist()
        loss = values[0] / (self.micro * dist.get_world_size())
        self.window.zero_()
        self.micro = 0
        return loss, values[1], values[2] if extra is not None else None

    def totals(self) -> tuple[int, int]:
        """Samples and real tokens trained on in this segment, all ranks (a collective: every rank calls it)."""
        seen = self.seen.clone()
        dist.all_reduce(seen)
        samples, tokens = seen.tolist()
        return int(samples), int(tokens)


class Monitor:
    """Progress bar and TensorBoard writer on rank 0; a no-op elsewhere. After ``--resume`` it continues the earlier
    segments' history and wall time (``earlier``, from the checkpoint) and purges their TensorBoard points past the
    resumed step, which the new segment writes again."""

    def __init__(self, rank: int, log_dir: Path, total_steps: int, start_step: int, earlier: dict | None = None):
        self.active = rank == 0
        earlier = earlier or {}
        # every logged point up to the resumed step, for train_summary.json
        self.history: list[dict[str, float]] = [h for h in earlier.get("history", []) if h["step"] <= start_step]
        self.evals: list[dict[str, float]] = [e for e in earlier.get("eval_history", []) if e["step"] <= start_step]
        self.shown: dict[str, str] = {}  # the bar's postfix: the last training and eval values
        self.earlier = {k: earlier.get(k, 0) for k in ("wall_seconds", "samples", "tokens")}
        self.bar = None
        self.writer = None
        self.start = time.perf_counter()
        if self.active:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: readers drop points at steps >= it that earlier (killed) segments wrote
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def wall(self) -> float:
        """Seconds of training so far, earlier segments (up to their last checkpoint) included."""
        return self.earlier["wall_seconds"] + time.perf_counter() - self.start

    def step(self, step: int, scalars: dict[str, float] | None) -> None:
        """Advance the bar by one optimizer step; with scalars, also write them (names like ``train/loss``)."""
        if not self.active:
            return
        self.bar.update(1)
        if scalars:
            wall = self.wall()
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.add_scalar("train/wall_s", wall, step)
            self.history.append({"step": step, "wall_s": wall, **scalars})
            self.shown.update(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}",
                              tok_s=f"{scalars['train/tokens_per_s']:.0f}")
            self.bar.set_postfix(self.shown)

    def evaluated(self, step: int, scalars: dict[str, float]) -> None:
        """Write an evaluation's scalars (``eval/loss``, ``eval/<metric>``); the bar shows them until the next."""
        if not self.active:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.evals.append({"step": step, **scalars})
        self.shown.update({name.replace("/", "_"): f"{value:.4f}" for name, value in scalars.items()})
        self.bar.set_postfix(self.shown)

    def snapshot(self, samples: int, tokens: int, **extra) -> dict:
        """The running summary to keep in a checkpoint (``samples``/``tokens``: this segment's, all ranks), so a
        resumed run's summary covers the whole run. Flushes TensorBoard: its points up to here must survive a kill."""
        if self.writer is not None:
            self.writer.flush()
        return {"history": list(self.history), "eval_history": list(self.evals), "wall_seconds": self.wall(),
                "samples": self.earlier["samples"] + samples, "tokens": self.earlier["tokens"] + tokens, **extra}

    def close(self, path: Path | None = None, extra: dict | None = None, samples: int = 0, tokens: int = 0) -> None:
        """Close the bar and writer; with ``path``, also write the run's summary (what compare.py reads): all
        segments of a resumed run, ``samples``/``tokens`` being this segment's."""
        if not self.active:
            return
        self.bar.close()
        self.writer.close()
        if path is not None and self.history:
            losses = [h["train/loss"] for h in self.history]
            wall = self.wall()
            samples, tokens = self.earlier["samples"] + samples, self.earlier["tokens"] + tokens
            summary = {**(extra or {}), "samples": samples, "tokens": tokens, "samples_per_s": samples / wall,
                       "tokens_per_s": tokens / wall, "wall_seconds": wall, "final_loss": losses[-1],
                       "best_loss": min(losses), "peak_mem_gb": max(h["train/peak_mem_gb"] for h in self.history),
                       "history": self.history, **self.eval_summary()}
            path.write_text(json.dumps(summary, indent=2) + "\n")

    def eval_summary(self) -> dict:
        """train_summary.json's evaluation fields: the last values (``eval_loss``, ``eval``) and every point."""
        if not self.evals:
            return {}
        last = self.evals[-1]
        return {"eval_loss": last.get("eval/loss"), "eval": last, "eval_history": self.evals}
