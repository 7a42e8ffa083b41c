"""Data-parallel x sequence-parallel groups through DeepSpeed's own sequence-parallel state (its mpu).

Ranks ``[i*P, (i+1)*P)`` form sequence-parallel group i (one sequence, P shards); the data-parallel
index of a rank is ``rank // P``. DeepSpeed's engine reads the groups from the mpu passed to
``deepspeed.initialize(mpu=...)``: it reduces gradients and partitions ZeRO state over the
sequence-data-parallel group (every rank) and divides summed gradients by ``world / P`` (the DP size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class SequenceParallelGroups:
    """This rank's place in the DP x SP grid; ``mpu`` is DeepSpeed's ``parallel_state_sp`` module."""

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: object
    mpu: object


def init_sequence_parallel_groups(sp_size: int) -> SequenceParallelGroups:
    """Create (once) DeepSpeed's sequence-parallel groups of ``sp_size`` consecutive ranks."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    if not dist.is_initialized():
        raise ValueError("sequence parallelism needs an initialised process group (deepspeed.init_distributed)")
    world = dist.get_world_size()
    if not isinstance(sp_size, int) or sp_size < 2:
        raise ValueError(f"parallel.sequence_parallel_size must be an integer >= 2 here, got {sp_size!r}")
    if world % sp_size != 0:
        raise ValueError(
            f"parallel.sequence_parallel_size={sp_size} must divide the number of ranks ({world})")
    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sp_size)
    elif mpu.get_sequence_parallel_world_size() != sp_size:
        raise ValueError(f"sequence-parallel groups already exist with size {mpu.get_sequence_parallel_world_size()}, "
                         f"not parallel.sequence_parallel_size={sp_size}")
    rank = dist.get_rank()
    return SequenceParallelGroups(
        sp_size=sp_size, sp_rank=mpu.get_sequence_parallel_rank(), dp_size=world // sp_size, dp_rank=rank // sp_size,
        sp_group=mpu.get_sequence_parallel_group(), mpu=mpu,
    )


def release_sequence_parallel_groups() -> None:
    """Forget the groups (after ``destroy_process_group``), so that a later run can create new ones."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    mpu._release_sequence_parallel_groups()
