#!/usr/bin/env bash
# The main job: set up .venv, fine-tune SmolLM2-135M (native 8K) at 16K tokens on CPU with 2 DeepSpeed ranks
# (MS attention with the model default options, plain RoPE, reduced LoRA, ZeRO-3 offload;
# ds_configs/recipes/smollm2_16k.yaml), export the merged model, then show where the gain comes from on a held-out
# Shakespeare work, one change per row:
#   1 base model, dense attention, plain RoPE          (the model as shipped)
#   2 base model, dense attention, dynamic NTK alpha 4 (positions changed: what a user would pick)
#   3 base model, MS attention, plain RoPE             (attention changed: compact far positions need no NTK)
#   4 fine-tuned, MS attention, plain RoPE             (training changed)
#   5 fine-tuned, dense attention, dynamic NTK alpha 4 (attention after training)
# and passkey retrieval beyond the native 8K: the base model (dense, dynamic NTK, bf16 weights: the same answers as
# fp32 on this benchmark's prompts, 4x faster) against the system (fine-tuned, MS attention).
# Environment: OUT (runs/main_job), CTX (16384), STEPS (default: the recipe's train.max_steps), PASSKEY_LENGTHS
# (32768), PASSKEY_TRIALS (2), PASSKEY=0 skips passkey. --verbose shows every library's log. Other arguments are
# recipe overrides, e.g.  bash launch/main_job.sh --train.lr=1e-4
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [ "$a" = --verbose ]; then export DS_MSATTN_VERBOSE=1; else args+=("$a"); fi
done
VERBOSE=${DS_MSATTN_VERBOSE:-0}
bash launch/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${DS_MSATTN_CACHE:-$HOME/.cache/ds_msattn}/torch_extensions}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
RECIPE=ds_configs/recipes/smollm2_16k.yaml
OUT=${OUT:-runs/main_job}
CTX=${CTX:-16384}
PASSKEY=${PASSKEY:-1}
PASSKEY_LENGTHS=${PASSKEY_LENGTHS:-32768}
PASSKEY_TRIALS=${PASSKEY_TRIALS:-2}
quiet=(--quiet)
ds_quiet=(--quiet)
if [ "$VERBOSE" != 0 ]; then quiet=(); ds_quiet=(); fi
# DeepSpeed on a machine without CUDA: say so (it otherwise warns that it found no accelerator)
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
mkdir -p "$OUT"
t_job=$(date +%s)
since() { echo "$(( ($(date +%s) - $1) / 60 )) min $(( ($(date +%s) - $1) % 60 )) s"; }
measure() {  # measure NAME command...: peak RSS of its largest process into $OUT/peak_rss.tsv (GNU time, if any)
  local name=$1
  shift
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "$name	%M" -a -o "$OUT/peak_rss.tsv" "$@"
  else
    "$@"
  fi
}
rm -f "$OUT/peak_rss.tsv"

# The held-out document: the last work by name (the recipe trains on the first 41 of 42).
RECIPE_STEPS=$($PY - "$OUT/heldout.txt" "$RECIPE" <<'PYEOF'
import sys
import yaml
from ds_msattn.corpora import corpus_texts
texts = corpus_texts("shakespeare")
name = list(texts)[-1]
open(sys.argv[1], "w").write(texts[name])
print(f"held-out work: {name} ({len(texts[name])} characters; the recipe trains on the other 41)", file=sys.stderr)
print(yaml.safe_load(open(sys.argv[2]))["train"]["max_steps"])
PYEOF
)
STEPS=${STEPS:-$RECIPE_STEPS}
steps_arg=()
if [ "$STEPS" != "$RECIPE_STEPS" ]; then
  echo "STEPS=$STEPS overrides the recipe's train.max_steps=$RECIPE_STEPS"
  steps_arg=(--train.max_steps="$STEPS")
fi
n_pk=$(echo "$PASSKEY_LENGTHS" | tr ',' '\n' | grep -c .)
echo "main job: about $(( STEPS * 5 + 6 + (PASSKEY != 0 ? n_pk * PASSKEY_TRIALS * 2 : 0) )) min on a 2-core CPU" \
     "(fine-tuning about 5 min per step, 5 perplexity rows about 1 min each, passkey 1-3 min per trial);" \
     "outputs in $OUT"

# ------------------------------------------------------------------ 1. fine-tuning
echo
echo "== 1/4 fine-tuning: $STEPS steps of 16384 tokens on 2 CPU ranks (about $(( STEPS * 5 )) min;" \
     "a progress line every minute; metrics in $OUT/metrics.jsonl)"
if ls -d "$OUT"/checkpoints/step_* >/dev/null 2>&1; then
  echo "   resuming from $(ls -d "$OUT"/checkpoints/step_* | tail -1) (the recipe has resume: auto; delete $OUT to start over)"
fi
t0=$(date +%s)
measure train env OMP_NUM_THREADS=1 .venv/bin/deepspeed "${ds_quiet[@]}" --num_gpus 2 --master_port "${MASTER_PORT:-29533}" \
  --module ds_msattn.train --config "$RECIPE" --output_dir="$OUT" "${steps_arg[@]}" "${args[@]}"
echo "   training took $(since "$t0")"

# ------------------------------------------------------------------ 2. perplexity
echo
echo "== 2/4 perplexity at a $CTX-token context on the held-out work: 5 rows (about 1 min each)"
ROW=0
ppl() {  # label, description, then ds-msattn eval ppl arguments
  local label=$1 text=$2 t
  shift 2
  ROW=$((ROW + 1))
  echo "   [$ROW/5] $text"
  t=$(date +%s)
  measure "ppl_$label" .venv/bin/ds-msattn eval ppl --text-file "$OUT/heldout.txt" --context "$CTX" --max-windows 1 "${quiet[@]}" \
    --output "$OUT/ppl_$label.json" "$@"
  $PY -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print(f\"         ppl {r['ppl']:.2f} ({sys.argv[2]})\")" \
    "$OUT/ppl_$label.json" "$(since "$t")"
}
MS=(--attn ms_attention --region-size 16 --top-k 64 --merge 16 --sink-regions 1)
# Dense attention past 8K needs a larger RoPE base: dynamic NTK alpha 4 (the baseline users would pick). MS rows
# keep the model's own base: compact far positions hold every distance below K*c = 1024 (--rope none: the
# model's config; the merged model stores the base it trained with, plain unless positions.enabled was set).
DYN=(--rope dynamic --rope-factor 4)
ppl base_dense_plain "base model, dense attention, plain RoPE" --model smollm2 --attn sdpa --rope none --rope-factor 1
ppl base_dense_ntk "base model, dense attention, dynamic NTK alpha 4" --model smollm2 --attn sdpa "${DYN[@]}"
ppl base_ms "base model, MS attention, plain RoPE" --model smollm2 "${MS[@]}" --rope none --rope-factor 1
ppl tuned_ms "fine-tuned, MS attention, its trained base" --model "$OUT/merged" "${MS[@]}" --rope none --rope-factor 1
ppl tuned_dense "fine-tuned, dense attention, dynamic NTK alpha 4" --model "$OUT/merged" --attn sdpa "${DYN[@]}"

# ------------------------------------------------------------------ 3. passkey beyond the native 8K
# PASSKEY ROWS (issue 11 adds retrieval options: new rows or flags go here, e.g. --far-positions/--score/--select-per
# on the system's row, longer lengths such as 32768 through PASSKEY_LENGTHS). Each row is one `ds-msattn eval
# passkey` run on the same prompts (keys and depths are seeded by the length).
echo
if [ "$PASSKEY" != 0 ]; then
  echo "== 3/4 passkey at $PASSKEY_LENGTHS tokens, $PASSKEY_TRIALS trials per length, 2 rows" \
       "(about $(( n_pk * PASSKEY_TRIALS * 2 )) min)"
  passkey() {  # label, description, then ds-msattn eval passkey arguments
    local label=$1 text=$2 t
    shift 2
    echo "   $text"
    t=$(date +%s)
    measure "passkey_$label" .venv/bin/ds-msattn eval passkey --lengths "$PASSKEY_LENGTHS" --trials "$PASSKEY_TRIALS" "${quiet[@]}" \
      --output "$OUT/passkey_$label.json" "$@"
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print('         passed', ', '.join(f'{k}: {v}' for k, v in r['passed'].items()), f'({sys.argv[2]})')" \
      "$OUT/passkey_$label.json" "$(since "$t")"
  }
  passkey base_dense_dynamic "base model, dense attention, dynamic NTK alpha 4, bf16 weights (the strong baseline)" \
    --model smollm2 --attn sdpa "${DYN[@]}" --dtype bfloat16
  passkey tuned_ms "fine-tuned, MS attention (the system)" --model "$OUT/merged" "${MS[@]}" --rope none --rope-factor 1
else
  echo "== 3/4 passkey skipped (PASSKEY=0)"
fi

# ------------------------------------------------------------------ 4. the table
echo
echo "== 4/4 summary (whole job $(since "$t_job"))"
$PY - "$OUT" "$CTX" "$PASSKEY" <<'PYEOF'
import json
import sys
from pathlib import Path

out, ctx, with_passkey = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] != "0"
merged = json.loads((out / "merged" / "config.json").read_text())
theta = lambda cfg: (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))  # noqa: E731
plain = 1e5
tuned = theta(merged)
tuned_text = (f"{tuned:,.0f} ({'plain' if tuned == plain else 'trained'})" if tuned else "merged config")
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
print("\nfine-tuning (rank 0; 2 ranks in all)")
print("step  loss     step time   tokens/s  peak RSS rank 0")
for r in rows:
    print(f"{r['step']:>4}  {r['loss']:.4f}  {r['step_time_s']:8.1f} s  {r['tokens_per_s']:8.1f}  "
          f"{r['peak_memory_mib']:.0f} MiB")
print(f"\nperplexity at a {ctx}-token context on the held-out work (SmolLM2's native context: 8192)")
def ms_label(label):  # MS parameters and options as the row's JSON records them
    p = json.loads((out / f"{label}.json").read_text()).get("ms_attention") or {}  # every option that ran
    text = f"MS c{p.get('region_size')} K{p.get('top_k')} m{p.get('merge')} s{p.get('sink_regions')}"
    extra = [p.get("far_positions", "exact")] if p.get("far_positions", "exact") != "exact" else []
    extra += ["pos-free"] if p.get("score", "rope") == "position_free" else []
    extra += ["per kv group"] if p.get("select_per", "head") == "kv_group" else []
    return text + (f" {' '.join(extra)}" if extra else "")


print(f"{'':2}{'model':<11}{'attention':<36}{'RoPE base':<30}{'ppl':>8}  change from the row above")
ms = ms_label("ppl_base_ms")
table = [
    ("base_dense_plain", "base", "dense (sdpa)", f"{plain:,.0f} (plain)", "-"),
    ("base_dense_ntk", "base", "dense (sdpa)", "dynamic NTK alpha 4", "positions"),
    ("base_ms", "base", ms, f"{plain:,.0f} (plain)", "attention"),
    ("tuned_ms", "fine-tuned", ms, tuned_text, "training"),
    ("tuned_dense", "fine-tuned", "dense (sdpa)", "dynamic NTK alpha 4", "attention"),
]
prev = None
for i, (label, model, attn, rope, change) in enumerate(table, 1):
    r = json.loads((out / f"ppl_{label}.json").read_text())["results"][0]
    delta = "" if prev is None else f" ({(r['ppl'] / prev - 1) * 100:+.1f}%)"
    print(f"{i:<2}{model:<11}{attn:<36}{rope:<30}{r['ppl']:8.2f}  {change}{delta}")
    prev = r["ppl"]
rss = out / "peak_rss.tsv"
if rss.is_file():
    peaks = {}
    for line in rss.read_text().splitlines():
        name, _, kib = line.rpartition("\t")
        if kib.strip().isdigit():
            peaks[name] = int(kib) / 2**20
    train = peaks.pop("train", None)
    evals = max(peaks.values(), default=None)
    text = [f"training: {train:.1f} GiB in the largest rank (2 ranks)" if train else None,
            f"evaluation: {evals:.1f} GiB at most" if evals else None]
    print("\npeak memory (RSS): " + "; ".join(t for t in text if t))
if with_passkey:
    print("\npasskey retrieval (same prompts in both rows; a trial passes when the first integer generated is the key)")
    for label, text in [("base_dense_dynamic", "base, dense (sdpa), dynamic NTK alpha 4, bf16"),
                        ("tuned_ms", f"fine-tuned, {ms_label('passkey_tuned_ms')}, RoPE base {tuned_text}")]:
        r = json.loads((out / f"passkey_{label}.json").read_text())
        print(f"  {text:<76}" + "  ".join(f"{k}: {v}" for k, v in r["passed"].items()))
PYEOF
