"""Checkpoints that describe themselves: the trainable weights (safetensors) plus ``meta.json``.

A checkpoint directory ``<output_dir>/checkpoint-<step>/`` holds
- the method's weights: ``trainable.safetensors`` (every ``requires_grad`` tensor under its model name: the trained
  layers, the embedding, or ``transformer.prefix_encoder.*`` with the original key names), or for LoRA the PEFT
  adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``meta.json``: method, its arguments, the data/length arguments, the base model and the step, so prediction never
  asks the user to re-type a setting;
- ``engine/`` (training runs only): DeepSpeed's optimizer, scheduler and trainable-module state, for ``--resume``.
It is assembled under a temporary name and renamed when complete, so a killed run never leaves half a checkpoint.
Under ZeRO-3 every rank holds a slice of each parameter: the weights are gathered first, so the files are the same
as under ZeRO-1 (same names, keys, shapes and dtypes).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

META_FILE = "meta.json"
WEIGHTS_FILE = "trainable.safetensors"
ENGINE_DIR = "engine"  # DeepSpeed's state and each rank's RNG, for --resume
_NAME = re.compile(r"checkpoint-(\d+)")
_LOW_SPACE = 16 * 2**20  # bytes: below this, a failed write is taken for a full disk


def gathered(params: list[nn.Parameter], modify: bool = False):
    """Under ZeRO-3, make ``params`` whole on every rank for the block (a collective: every rank enters it); with
    ``modify``, what rank 0 writes into them is partitioned back on exit. Without ZeRO-3 this does nothing."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed  # only a ZeRO-3 model gets here, so this costs nothing (predict never loads deepspeed)

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None)


def trainable_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole and on the CPU, under its model name (a tied tensor once).

    Under ZeRO-3 every rank must call this (each tensor is gathered, one at a time, so no rank holds more than one
    extra whole tensor); ranks that will not write pass ``keep=False`` and get nothing back.
    """
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with gathered([p]):
                if keep:
                    state[name] = p.detach().to("cpu", copy=True).contiguous()
    return state


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name the file and the device when a write fails for lack of space: torch.save says only "basic_ios::clear:
    iostream error" or "file write failed", safetensors an I/O error without a path."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if getattr(err, "errno", None) != errno.ENOSPC and free_bytes(path) >= _LOW_SPACE:
            raise
        raise OSError(errno.ENOSPC, f"no space left on {device_of(path)} while writing {path} ({err}); free space "
                      "there (older checkpoints, or keep fewer with --save_total_limit) and run again") from err


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def device_of(path: Path) -> str:
    """``/dev/sda1 (mounted at /work)``: the file system ``path`` is on."""
    mount = _existing(path)
    while mount != mount.parent and os.stat(mount.parent).st_dev == os.stat(mount).st_dev:
        mount = mount.parent
    try:
        mounts = [line.split()[:2] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        mounts = []
    device = next((dev for dev, point in reversed(mounts) if point == str(mount)), "the device")
    return f"{device} (mounted at {mount})"


def write_weights(model: nn.Module, directory: Path, tuner: types.ModuleType,
                  state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the method's weights; ``state`` is :func:`trainable_state` when the caller gathered it already."""
    state = trainable_state(model) if state is None else state
    if hasattr(tuner, "save_weights"):
        tuner.save_weights(model, directory, state)
    else:
        with writing(directory / WEIGHTS_FILE):
            save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})


def write_meta(directory: Path, meta: dict) -> None:
    with writing(directory / META_FILE):
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a missing, truncated or foreign one fails naming its path."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {path.parent} is not a complete checkpoint of this method")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read its tensors ({err}); the file is truncated or damaged (a full disk or "
                         "an interrupted copy): copy it again or use another checkpoint") from None


def staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is assembled before :func:`publish` renames it into place."""
    return Path(output_dir) / f".checkpoint-{step}.partial"


def stage(directory: Path) -> Path:
    """An empty staging directory: what a killed run left under this name (RNG files, another world size's ZeRO
    shards) is removed first, so it can never be published with the new checkpoint."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def publish(staging: Path, final: Path | None = None) -> Path:
    """Rename a complete staging directory to its final name. An existing checkpoint of that name is renamed aside
    first and deleted only once the new one is in place; if the rename fails it is put back (a crash between the
    two renames is repaired by :func:`recover`)."""
    final = final or staging.with_name(staging.name.removeprefix(".").removesuffix(".partial"))
    aside = _aside(final)
    if aside.exists():
        shutil.rmtree(aside)
    replacing = final.exists()
    if replacing:
        os.replace(final, aside)
    try:
        os.replace(staging, final)
    except BaseException:
        if replacing:
            os.replace(aside, final)
        raise
    if replacing:
        shutil.rmtree(aside)
    return final


def recover(output_dir: str | Path) -> None:
    """At the start of a run (its lock held): drop stale staging directories, and put back a checkpoint that a
    crash left renamed aside in :func:`publish` (or drop it when its replacement made it)."""
    for leftover in [*Path(output_dir).glob(".checkpoint-*.partial"), *Path(output_dir).glob(".checkpoint-*.deleting")]:
        shutil.rmtree(leftover)
    for aside in Path(output_dir).glob(".checkpoint-*.old"):
        final = aside.with_name(aside.name.removeprefix(".").removesuffix(".old"))
        if final.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, final)


def save(model: nn.Module, directory: Path, meta: dict, tuner: types.ModuleType) -> Path:
    """Write weights + meta.json atomically to ``directory`` (a single-process save, used outside training)."""
    directory = Path(directory)
    staging = stage(directory.with_name(f".{directory.name}.partial"))
    write_weights(model, staging, tuner)
    write_meta(staging, meta)
    return publish(staging, directory)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint of this project: it has no {META_FILE}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_weights(model: nn.Module, directory: str | Path, tuner: types.ModuleType) -> None:
    """Load a checkpoint's weights into a model prepared the same way (built with the overrides, tuner applied).

    Every trainable tensor of the model must be in the file with its shape, and the file must hold nothing else.
    """
    directory = Path(directory)
    if hasattr(tuner, "load_weights"):
        tuner.load_weights(model, directory)
        return
    state = read_tensors(directory / WEIGHTS_FILE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}  # ZeRO-3: the whole shape
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    wrong = [f"{n} {tuple(state[n].shape)} vs {shapes[n]}" for n in params.keys() & state.keys()
             if tuple(state[n].shape) != shapes[n]]
    if missing or unexpected or wrong:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not fit the model: missing {missing}, unexpected "
                         f"{unexpected}, wrong shape {wrong}")
    with torch.no_grad(), gathered(list(params.values()), modify=True):
        for name, p in params.items():
            p.copy_(state[name])


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``output_dir``, oldest step first (staging and aside directories never count)."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := _NAME.fullmatch(p.name)) and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir`` (partial ones are never picked)."""
    found = checkpoints(output_dir)
    return found[-1] if found else None
