#!/usr/bin/env bash
# Several nodes from a hostfile ("host slots=N" per line), through the deepspeed launcher.
#   HOSTFILE=hosts MASTER_ADDR=node0 bash launch/multinode.sh --config ds_configs/recipes/smollm2_16k.yaml
# With passwordless ssh (pdsh or ssh), run it once on the first host. Without ssh, run it on every host
# with NODE_RANK=0..N-1 set: each node then starts only its own ranks (deepspeed --no_ssh).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:?set HOSTFILE to a file of lines "hostname slots=N"}
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
PORT=${MASTER_PORT:-29500}
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_msattn/torch_extensions}"
args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$PORT")
if [ -n "${NODE_RANK:-}" ]; then
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec .venv/bin/deepspeed "${args[@]}" --module ds_msattn.train "$@"
