"""Helpers for tests that start training processes: a clean environment, a free port on 127.0.0.1, gloo ranks."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def clean_env(threads: int) -> dict:
    """This process' environment without distributed variables, with ``threads`` OpenMP threads."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def shm_left(port: int, world: int) -> list[Path]:
    """DeepSpeed shared-memory all-reduce segments of a local job on ``port`` still in /dev/shm (none after
    ``ds_msattn.parallel.exit.exit_rank``)."""
    from ds_msattn.parallel.exit import shm_buffer_path

    return [p for p in (shm_buffer_path(r, "127.0.0.1", str(port)) for r in range(world)) if p.exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, args: list[str], world: int, root: Path, timeout: float = 300) -> None:
    """Run ``python script *args`` as ``world`` local ranks (1 thread each) and assert that every rank exits 0."""
    port = free_port()
    procs = []
    for r in range(world):
        env = clean_env(1)
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(root))
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for r, p in enumerate(procs):
        text, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"rank {r} failed:\n{text[-3000:]}"
