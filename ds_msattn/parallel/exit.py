"""How a distributed rank ends: tear down, release what DeepSpeed leaves behind, and leave through ``os._exit``.

gloo's threads can abort an ordinary interpreter exit, so ranks end with ``os._exit`` once the process group is
gone. DeepSpeed's CPU communication op (``deepspeed/ops/csrc/cpu/comm/shm.cpp``), built whenever every rank of the
job is on one host, creates one shared-memory all-reduce segment per rank,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (69 MB), and never unlinks it:
without :func:`exit_rank` every local multi-rank run left ``69 MB x ranks`` of RAM in ``/dev/shm`` until
the next reboot (64 such files, 4.3 GiB, had piled up on this project's 2-core machine).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int, addr: str | None = None, port: str | None = None) -> Path:
    """The segment DeepSpeed's CPU comm op made for ``rank`` (address and port from the environment by default)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> bool:
    """Unlink ``rank``'s segment (peers keep their mappings: only the name goes); True if there was one."""
    try:
        shm_buffer_path(rank).unlink()
        return True
    except FileNotFoundError:
        return False


def exit_rank(code: int) -> NoReturn:
    """End this rank: flush, release the job's shared-memory segments (its own and its peers': names only, every
    rank mapped them at start-up; a peer killed by a signal leaves its own behind otherwise), destroy the process group (only after success:
    after a failure a peer may be gone and the teardown could block on it), finalise MPI if mpirun started us, and
    ``os._exit(code)``."""
    import torch.distributed as dist

    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():  # every rank's segment: a peer killed by a signal cannot remove its own
        for rank in range(dist.get_world_size()):
            release_shm_buffer(rank)
        if code == 0:
            dist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")  # launched by mpirun: finalise, or OpenMPI reports a failure
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
