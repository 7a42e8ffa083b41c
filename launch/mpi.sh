#!/usr/bin/env bash
# MPI: mpirun starts the ranks; DeepSpeed's MPI discovery (mpi4py) turns them into a process group.
#   NPROC=2 bash launch/mpi.sh --config ds_configs/recipes/tiny.yaml
#   NPROC=16 MPI_ARGS="--hostfile hosts" bash launch/mpi.sh --config ...       (several nodes)
# DeepSpeed takes MASTER_ADDR from rank 0's `hostname -I` (first address); as root OpenMPI needs
# --allow-run-as-root, and --oversubscribe when there are more ranks than cores.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_msattn/torch_extensions}"
extra=()
if [ "$(id -u)" = 0 ]; then extra+=(--allow-run-as-root); fi
if .venv/bin/mpirun --version 2>&1 | grep -qi "open mpi"; then
  extra+=(--oversubscribe -x TORCH_EXTENSIONS_DIR -x OMP_NUM_THREADS -x PATH)
fi
# shellcheck disable=SC2086
exec .venv/bin/mpirun -np "$NPROC" "${extra[@]}" ${MPI_ARGS:-} .venv/bin/python -m ds_msattn.train "$@"
