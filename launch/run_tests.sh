#!/usr/bin/env bash
# Sets up the environment (launch/setup_env.sh) and runs the whole test suite (what CI runs: .ci/run).
# Arguments, if any, replace the test selection (e.g. bash launch/run_tests.sh tests/test_docs.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${DS_MSATTN_CACHE:-$HOME/.cache/ds_msattn}/torch_extensions}"
if [ $# -eq 0 ]; then
  echo "tests: the whole suite (10-25 min on a 2-core CPU, about 570 tests; a dot per test)"
  set -- tests
fi
exec .venv/bin/python -m pytest -q -ra "$@"
