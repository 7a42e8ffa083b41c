"""Run a function on P gloo ranks in real local processes (tests and the scaling benchmark).

Each rank joins a process group through a TCP store on 127.0.0.1; the group is destroyed in
``finally`` so that no gloo thread outlives it (FACTS.md: exit aborts otherwise).
"""

from __future__ import annotations

import queue as queue_mod
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, fn, args, results) -> None:
    torch.set_num_threads(threads)  # ranks share the machine's cores
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, use_libuv=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        results.put((rank, fn(rank, world, *args), None))
    except BaseException:  # report, so the parent names the failing rank
        results.put((rank, None, traceback.format_exc()))
    finally:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, threads: int = 1, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world, *args)`` (a picklable top-level function) on ``world`` gloo processes.

    Returns the values by rank; raises AssertionError with every failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, threads, fn, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world):
            try:
                # after a failure the other ranks usually hang in a collective: do not wait long
                rank, value, err = results.get(timeout=10 if errors else timeout)
            except queue_mod.Empty:
                errors.append(f"no result within {timeout} s (exit codes {[p.exitcode for p in procs]})")
                break
            if err:
                errors.append(f"rank {rank}:\n{err}")
            values[rank] = value
    finally:
        for p in procs:
            p.join(30 if not errors else 5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [values[r] for r in range(world)]
