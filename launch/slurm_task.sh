#!/usr/bin/env bash
# Run by srun once per task: maps SLURM's variables to what torch.distributed / DeepSpeed read, then runs
# the command. (DeepSpeed reads no SLURM_* variables: without this every task is a world of size 1.)
set -euo pipefail
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
exec "$@"
