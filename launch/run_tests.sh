#!/usr/bin/env bash
# Sets up the environment (launch/setup_env.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_msattn/torch_extensions}"
exec .venv/bin/python -m pytest -q -ra tests "$@"
