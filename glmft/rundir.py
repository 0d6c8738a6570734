"""The output directory of a training run: one writer at a time, no silent mixing of runs, bounded size.

- A lock file (``run.lock``: host and pid) is held by rank 0 for the whole run; a second run into the same directory
  is refused, and a lock left by a dead process on this host is taken over with a warning.
- A fresh run refuses a directory holding another run's results (checkpoints, ``train_summary.json``) unless
  ``--overwrite_output_dir``, which deletes them and that run's TensorBoard curves first; ``--resume`` refuses a
  checkpoint whose ``meta.json`` records other settings than the current ones, naming each of them.
- ``--save_total_limit N`` keeps the newest N checkpoints (and always the one resumed from, and the best: by eval
  loss or metric when the run evaluates, else by training loss).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch.distributed as dist

from glmft import checkpoint
from glmft.monitor import log

LOCK_FILE = "run.lock"
SUMMARY_FILE = "train_summary.json"


class OutputDirError(RuntimeError):
    """The output directory is in use, holds another run, or its checkpoint does not fit the current settings."""


def board_dir(train, method: str) -> Path:
    """This run's TensorBoard directory: ``<tensorboard_dir or output_dir/runs>/<run_name or method>``."""
    return Path(train.tensorboard_dir or Path(train.output_dir) / "runs") / (train.run_name or method)


@contextmanager
def claim(train, method: str) -> Iterator[None]:
    """Every rank enters: rank 0 takes the lock (held until the block ends, however it ends) and prepares the
    directory; the others learn whether that failed, so no rank is left waiting in a collective for a stopped one."""
    with ExitStack() as stack:
        error: Exception | None = None
        if dist.get_rank() == 0:
            try:
                stack.enter_context(lock(train.output_dir))
                prepare(Path(train.output_dir), board_dir(train, method), train.resume, train.overwrite_output_dir)
            except Exception as err:  # whatever stops rank 0 must stop every rank, or they wait for it
                error = err
        message = [str(error) if error else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise OutputDirError(message[0])
        yield


@contextmanager
def lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold ``<output_dir>/run.lock`` for the block; it is removed when the block ends, also on an exception."""
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _acquire(path, mine)
    try:
        yield path
    finally:
        if _holder(path) == mine:  # never remove a lock someone else took over
            path.unlink(missing_ok=True)


def _acquire(path: Path, mine: dict) -> None:
    # Written whole to a private file, then linked to the lock's name: the link fails if the lock exists, so two
    # runs can never both succeed, and a reader never sees a half-written lock.
    private = path.with_name(f".{LOCK_FILE}.{mine['host']}.{mine['pid']}")
    private.write_text(json.dumps(mine) + "\n")
    try:
        for _ in range(3):
            try:
                _create(path, private)
                return
            except FileExistsError:
                holder = _holder(path)
                if not _dead(holder):
                    raise OutputDirError(
                        f"{path.parent} is in use by another run: {path} names host {holder.get('host')} pid "
                        f"{holder.get('pid')} (started {holder.get('started')}). Wait for it to end or use another "
                        f"--output_dir; if that process is gone (on another machine, say), delete {path}") from None
                log.warning("%s was left by a run that is gone (host %s, pid %s): taking it over", path,
                            holder.get("host"), holder.get("pid"))
                path.unlink(missing_ok=True)
        raise OutputDirError(f"{path}: could not take the lock (other runs keep taking it)")
    finally:
        private.unlink(missing_ok=True)


def _create(path: Path, private: Path) -> None:
    try:
        os.link(private, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: an exclusive create (a reader may see it empty briefly)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(private.read_text())


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _dead(holder: dict) -> bool:
    """Only a process on this host can be checked; one elsewhere (or an unreadable lock) counts as alive."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def previous_results(output_dir: Path) -> list[Path]:
    return [*checkpoint.checkpoints(output_dir), *[p for p in [output_dir / SUMMARY_FILE] if p.exists()]]


def prepare(output_dir: Path, board: Path, resume: bool, overwrite: bool) -> None:
    """Rank 0, lock held: repair what a crash left, and refuse (or, with ``overwrite``, delete) another run's
    results before a fresh run."""
    checkpoint.recover(output_dir)
    if resume:
        return
    previous = previous_results(output_dir)
    if previous and not overwrite:
        names = ", ".join(p.name for p in previous)
        raise OutputDirError(f"{output_dir} holds another run's results ({names}); a fresh run there would mix with "
                             "them. Continue that run with --resume, delete them with --overwrite_output_dir, or "
                             "choose another --output_dir")
    stale = sorted(board.glob("events.out.tfevents.*")) if board.is_dir() else []
    for path in previous:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if previous or stale:  # a fresh run's curves start fresh: the earlier run's would overlap them
        shutil.rmtree(board, ignore_errors=True)
        log.warning("%s: deleted the earlier run's %s", output_dir,
                    ", ".join([p.name for p in previous] + [f"TensorBoard log {board}"] * bool(stale)))


def option(field: str) -> str:
    """How the user sets a meta.json field: ``data.learning_rate`` -> ``--learning_rate``."""
    special = {"base_model": "--model_dir", "training.world_size": "world size (number of ranks)",
               "training.zero_stage": "ZeRO stage (--deepspeed_config)"}
    return special.get(field, "--" + field.rsplit(".", 1)[-1] if "." in field else field)


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The fields of ``current`` that ``saved`` records differently (fields it lacks, from older versions, pass)."""
    found = []
    for key, now in current.items():
        if key not in saved:
            continue
        if isinstance(now, dict) and isinstance(saved[key], dict):
            found += differences(saved[key], now, f"{prefix}{key}.")
        elif saved[key] != now:
            found.append(f"{option(prefix + key)}: {saved[key]!r} in the checkpoint, {now!r} now")
    return found


def check_resume(output_dir: str | Path, current: dict) -> Path:
    """The checkpoint ``--resume`` continues from, after checking that it was written by a run like this one."""
    found = checkpoint.latest(output_dir)
    if found is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {output_dir}")
    diffs = differences(checkpoint.read_meta(found), json.loads(json.dumps(current)))
    if diffs:
        raise OutputDirError(f"--resume: {found / checkpoint.META_FILE} was written by a run with other settings: "
                             f"{'; '.join(diffs)}. Resume with the checkpoint's settings, or start a fresh run "
                             "(another --output_dir, or --overwrite_output_dir to delete this one's results)")
    return found


def _badness(ckpt: Path, by: dict | None) -> float:
    """Lower is better: the eval value named by ``by`` (meta.json's ``best_by``: name and direction) in the
    checkpoint's ``eval``, or without ``by`` its training ``loss``; inf when it has none."""
    meta = checkpoint.read_meta(ckpt)
    value = (meta.get("eval") or {}).get(by["name"]) if by else meta.get("loss")
    if not isinstance(value, int | float) or not math.isfinite(value):
        return math.inf
    return -value if by and by.get("higher_is_better") else value


def best(output_dir: str | Path) -> Path | None:
    """The best checkpoint, by the criterion the newest one records (eval loss or metric with --eval_path, else the
    training loss); None when no checkpoint has that value."""
    found = checkpoint.checkpoints(output_dir)
    if not found:
        return None
    by = checkpoint.read_meta(found[-1]).get("best_by")
    pick = min(found, key=lambda p: _badness(p, by))
    return pick if _badness(pick, by) < math.inf else None


def best_record(output_dir: str | Path) -> dict:
    """train_summary.json's ``best_checkpoint``: the one :func:`prune` keeps as the best, and its values."""
    found = best(output_dir)
    if found is None:
        return {}
    meta = checkpoint.read_meta(found)
    by = (meta.get("best_by") or {}).get("name", "train/loss")
    return {"best_checkpoint": {"path": str(found), "step": meta.get("step"), "by": by,
                                "train/loss": meta.get("loss"), **(meta.get("eval") or {})}}


def prune(output_dir: str | Path, limit: int, keep: set[Path]) -> list[Path]:
    """Delete all but the newest ``limit`` checkpoints; ``keep`` (the one just saved, the one resumed from) and the
    best (see :func:`best`) stay whatever their age. Returns the deleted ones."""
    found = checkpoint.checkpoints(output_dir)
    if not limit or len(found) <= limit:
        return []
    winner = best(output_dir)
    protected = {p.resolve() for p in [*keep, *found[-limit:]] + ([winner] if winner else [])}
    removed = [p for p in found if p.resolve() not in protected]
    for path in removed:  # renamed first: a half-deleted checkpoint must never look complete
        doomed = path.with_name(f".{path.name}.deleting")
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    return removed


def size_text(path: Path) -> str:
    """``1.2 MB (weights and meta 16.4 kB, engine state 1.2 MB)`` for a checkpoint directory."""
    everything, engine = _bytes(path), _bytes(path / checkpoint.ENGINE_DIR)
    return f"{_human(everything)} (weights and meta {_human(everything - engine)}, engine state {_human(engine)})"


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _human(n: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    power = min(int(math.log(max(n, 1), 1000)), len(units) - 1)
    return f"{n:.0f} B" if power == 0 else f"{n / 1000**power:.1f} {units[power]}"
