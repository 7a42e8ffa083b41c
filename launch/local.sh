#!/usr/bin/env bash
# One node: N processes through the deepspeed launcher (GPUs, or CPU ranks on gloo when there is no GPU).
#   NPROC=2 bash launch/local.sh --config ds_configs/recipes/tiny.yaml --parallel.sequence_parallel_size=2
# Extra arguments go to ds_msattn.train (config file + dotted overrides). Quiet by default: the launcher logs
# errors only (its --quiet) and the ranks follow ds_msattn.logs; --verbose (or DS_MSATTN_VERBOSE=1) shows it all.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [ "$a" = --verbose ]; then export DS_MSATTN_VERBOSE=1; else args+=("$a"); fi
done
NPROC=${NPROC:-$(python3 -c 'import shutil,subprocess;print(len(subprocess.run(["nvidia-smi","-L"],capture_output=True,text=True).stdout.splitlines()) if shutil.which("nvidia-smi") else 1)')}
PORT=${MASTER_PORT:-29500}
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_msattn/torch_extensions}"
launcher=()
if [ "${DS_MSATTN_VERBOSE:-0}" = 0 ]; then launcher+=(--quiet); fi
# No CUDA: say so (DeepSpeed otherwise warns once per process that it found no accelerator)
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
exec .venv/bin/deepspeed "${launcher[@]}" --num_gpus "$NPROC" --master_port "$PORT" --module ds_msattn.train \
  "${args[@]}"
