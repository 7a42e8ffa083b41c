"""Helpers for tests that start training processes: a clean environment and a free port on 127.0.0.1."""

import os
import socket


def clean_env(threads: int) -> dict:
    """This process' environment without distributed variables, with ``threads`` OpenMP threads."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
