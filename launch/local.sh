#!/usr/bin/env bash
# One node: N processes through the deepspeed launcher (GPUs, or CPU ranks on gloo when there is no GPU).
#   NPROC=2 bash launch/local.sh --config ds_configs/recipes/tiny.yaml --parallel.sequence_parallel_size=2
# Extra arguments go to ds_msattn.train (config file + dotted overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(python3 -c 'import shutil,subprocess;print(len(subprocess.run(["nvidia-smi","-L"],capture_output=True,text=True).stdout.splitlines()) if shutil.which("nvidia-smi") else 1)')}
PORT=${MASTER_PORT:-29500}
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_msattn/torch_extensions}"
exec .venv/bin/deepspeed --num_gpus "$NPROC" --master_port "$PORT" --module ds_msattn.train "$@"
