"""How compare.py starts a run: one plain process, or the deepspeed launcher on this machine or on the nodes of a
hostfile (checked as deepspeed reads it), with the run's output going to a log file."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def hostfile_nodes(path: str, num_nodes: int, num_gpus: int) -> list[str]:
    """The first ``num_nodes`` hosts (0: all) of a deepspeed hostfile (``HOST slots=N`` lines, ``#`` comments)."""
    slots: dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"--hostfile {path}: cannot read it ({err.strerror})") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        found = re.match(r"(\S+)\s+slots=(\d+)", line)
        if not found or found.group(1) in slots:
            raise ValueError(f"{path}, line {number}: {line!r} is not a new 'HOST slots=GPUS' line")
        slots[found.group(1)] = int(found.group(2))
    hosts = list(slots)[: num_nodes or None]
    if not hosts:
        raise ValueError(f"{path}: no 'HOST slots=GPUS' line")
    if num_nodes > len(hosts):
        raise ValueError(f"{path}: --num_nodes {num_nodes} asks for more than its {len(slots)} hosts")
    small = [f"{h} (slots={slots[h]})" for h in hosts if slots[h] < num_gpus]
    if small:
        raise ValueError(f"{path}: --num_gpus {num_gpus} per node, but {', '.join(small)} has fewer")
    return hosts


def prefix(kind: str, num_gpus: int, hostfile: str = "", num_nodes: int = 0) -> list[str]:
    """``python``, or the deepspeed launcher for ``num_gpus`` per node on this machine or a hostfile's nodes."""
    if kind == "python":
        return [sys.executable]
    beside = Path(sys.executable).parent / "deepspeed"  # the launcher of this interpreter's DeepSpeed
    cmd = [str(beside) if beside.is_file() else shutil.which("deepspeed") or "deepspeed"]
    if hostfile:  # the rendezvous is on the first host, at deepspeed's default port
        cmd += ["--hostfile", str(Path(hostfile).resolve())]
        cmd += ["--num_nodes", str(num_nodes)] if num_nodes else []
        return cmd + ["--num_gpus", str(num_gpus)]
    with socket.socket() as s:  # a free rendezvous port: a run never collides with another job's
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return cmd + ["--num_gpus", str(num_gpus), "--master_port", str(port)]


def execute(cmd: list[str], log_path: Path) -> tuple[int, float, str]:
    """Run ``cmd`` with its output going to ``log_path``; returns (exit code, seconds, output)."""
    print(f"  {shlex.join(cmd)}\n  log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except OSError as err:  # e.g. no deepspeed launcher on PATH
            log.write(f"OSError: cannot run {cmd[0]}: {err}\n")
            code = 127
    return code, time.perf_counter() - start, log_path.read_text(errors="replace")
