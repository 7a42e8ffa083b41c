#!/usr/bin/env bash
# The main job: set up, then run MS attention against dense attention on the real model (SmolLM2-135M).
# (The training area replaces this with fine-tune + evaluation once the pipeline lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_msattn/torch_extensions}" HF_HUB_OFFLINE=1
.venv/bin/ds-msattn demo "$@"
