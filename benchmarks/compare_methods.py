"""The seed papers' long-context methods side by side on SmolLM2-135M: perplexity, passkey and attention cost.

One harness for every row: the rows are rows of ``benchmarks/eval_retrieval.py`` (same prompts, keys, depths and
held-out text, seeded by length), run through its runner, so a cell measured there is not measured twice and a
rerun resumes from the trial files in ``benchmarks/results/eval_retrieval/``. This script picks the rows, runs the
missing cells (``run``), and gathers them with the attention cost into ``benchmarks/results/compare_methods.{md,csv,
png}`` (``report``).

    python benchmarks/compare_methods.py run --rows h2o --passkey 8192,16384,32768 --ppl 4096,16384,32768
    python benchmarks/compare_methods.py finetune   # S2-Attn, SF-Attn and MS: the same short fine-tune, then ppl
    python benchmarks/compare_methods.py time     # the 16K forward of every row again, side by side in one run
    python benchmarks/compare_methods.py report

Rows (without fine-tuning):

- ``dense_dynamic``: dense attention with dynamic NTK (factor 4): what S2-Attn and SF-Attn models run at inference
  (LongLoRA and SinkLoRA evaluate with full attention), so without their fine-tune the two are this row.
- ``h2o``: the same dense model with H2O's KV cache (budget 1024 tokens: the keys per query MS attention reads;
  recent 512; the prompt read in chunks of 64 tokens).
- ``today`` and ``compact_pf``: MS attention with the paper's rule and with the retrieval options.

Cost: ``keys/query`` is the mean number of keys a query of a T-token prefill attends to (exact, counted from each
method's rule); ``16K forward s`` is the measured time of the 16K perplexity window (one forward of the model over
16384 tokens plus its loss, 2 threads), each run alone through the heavy queue. ``time`` measures that window again
for every row, one after the other in one job (``eval_retrieval/time_<row>_16384.json``); the table then reads
those, so the column compares times of one run on one machine.

Heavy: run it through ``/work/shared/bin/heavy`` (one job at a time on the 2-core machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import eval_retrieval as er  # noqa: E402  (the rows, runner and trial files this table reads)

RESULTS = ROOT / "results"
#: rows of the comparison, in table order (keys of eval_retrieval.ROWS)
ROWS = ["dense_dynamic", "h2o", "esa", "esa_1k", "today", "compact_pf"]
#: ESA rows' projections: directory -> local window they are fitted for (calibration on training works only)
ESA_CALIBRATION = {"runs/esa/smollm2_w4096": 4096, "runs/esa/smollm2_w512": 512}
ESA_TOKENS, ESA_RANK = 16384, 32
PASSKEY = [8192, 16384, 32768]
#: passkey columns of the table: PASSKEY, plus 64K where measured (a 64K trial takes 2.5-20 min on the 2-core CPU)
PASSKEY_TABLE = PASSKEY + [65536]
#: a row's passkey lengths it has no trials for are read from this row instead, marked "(bf16)": the bf16 model
#: answered the same five prompts as the fp32 one trial by trial at 8K, 16K and 32K, in a quarter of the time
PASSKEY_FALLBACK = {"dense_dynamic": "dense_dynamic_bf16"}
PPL = [4096, 16384, 32768]
COST_T = 16384
#: the comparison fine-tune: tag (eval_retrieval.TAGS) -> (attention it trains with, row it is evaluated as, recipe
#: overrides of that run only). ftmsp keeps plain RoPE: CRD-NTK raises the base 4x, which dense attention at 32K
#: needs but compact positions (every distance below K*c = 1024) do not, and the MS default reads plain RoPE best
FINETUNE = {"fts2": ("s2_attention", "dense_own", []), "ftsf": ("sf_attention", "dense_own", []),
            "ftms": ("ms_attention", "compact_pf", []),
            "ftmsp": ("ms_attention", "compact_pf", ["--positions.enabled=false"])}
FT_LABELS = {"fts2": "S2-Attn after the comparison fine-tune (dense attention at inference)",
             "ftsf": "SF-Attn after the comparison fine-tune (dense attention at inference)",
             "ftms": "MS compact + position_free after the comparison fine-tune",
             "ftmsp": "MS compact + position_free after the comparison fine-tune with plain RoPE"}
FT_RECIPE = "ds_configs/recipes/smollm2_16k.yaml"
#: the same steps, data and positions for every method: the main job's recipe at 8K-token sequences (the native
#: context) with its CRD-NTK positions turned on (they place the sequences over the recipe's 32K cycle; dense
#: attention at 32K needs the larger base), two optimizer steps, 2 ranks as the main job.
#: glibc maps host tensors from 4 MiB (train.host_mmap_threshold_mib): with its default 32 the S2-Attn run's
#: heap holes took a rank to 11 GiB in the first forward and the machine (24 GiB, 2 ranks) ran out of memory;
#: with 4 the peak rank held 3.4 GiB (steps about 20% slower: benchmarks/results/host_allocator.md)
FT_OVERRIDES = ["--data.seq_len=8192", "--train.max_steps=2", "--positions.enabled=true",
                "--train.host_mmap_threshold_mib=4", "--resume=auto"]
FT_RUNS = "runs/compare_ft"


def _opt(args: list[str], flag: str, default):
    return type(default)(args[args.index(flag) + 1]) if flag in args else default


def keys_per_query(row: str, T: int) -> float:
    """Mean keys attended per query over a causal T-token prefill, from the row's eval arguments."""
    args = er.ROWS[row][1]
    if "ms_attention" in args:
        c, K, m = _opt(args, "--region-size", 16), _opt(args, "--top-k", 64), _opt(args, "--merge", 16)
        total = 0
        for p in range(T):
            b = p // (m * c)
            total += min(b * m, K - m) * c + (p - b * m * c + 1)  # selected history regions + own block, causal
        return total / T
    if "esa_attention" in args:
        from ds_msattn.attention.esa import DEFAULT_ESA

        top, sinks = _opt(args, "--esa-top-k", DEFAULT_ESA["top_k"]), _opt(args, "--esa-sink-tokens", DEFAULT_ESA["sink_tokens"])
        local, chunk = _opt(args, "--esa-local-window", DEFAULT_ESA["local_window"]), _opt(args, "--esa-chunk", DEFAULT_ESA["chunk_size"])
        total = 0
        for p in range(T):
            start = (p // chunk) * chunk  # the query's chunk: its own part causally, then local, initial, selected
            before = start
            near = min(before, local)
            far = before - near
            total += (p - start + 1) + near + min(far, sinks) + min(max(far - sinks, 0), top)
        return total / T
    if _opt(args, "--kv-cache", "none") == "h2o":
        budget, chunk = _opt(args, "--kv-budget", 0), _opt(args, "--kv-chunk", 64)
        # a query of a step sees the kept cache (at most the budget) and its own step up to itself
        return sum(min((p // chunk) * chunk, budget) + p % chunk + 1 for p in range(T)) / T
    return (T + 1) / 2  # dense causal


def calibrate_esa(rows) -> None:
    """Fit the ESA projections a row needs, once (``ds-msattn esa-calibrate``)."""
    from ds_msattn.cli import main as cli_main

    for row in rows:
        args = er.ROWS[row][1]
        if "--esa-projections" not in args:
            continue
        out = args[args.index("--esa-projections") + 1]
        if (ROOT.parent / out / "esa_projections.json").exists():
            continue
        cli_main(["esa-calibrate", "--model", "smollm2", "--out", str(ROOT.parent / out), "--tokens", str(ESA_TOKENS),
                  "--rank", str(ESA_RANK), "--local-window", str(ESA_CALIBRATION[out])])


def run(args) -> None:
    unknown = [r for r in args.rows if r not in er.ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown rows {unknown}; known: {', '.join(er.ROWS)}")
    calibrate_esa(args.rows)
    if args.passkey:
        er.main(["--rows", ",".join(args.rows), "--lengths", ",".join(map(str, args.passkey)),
                 "--haystacks", args.haystacks, "--depths", "0.1,0.3,0.5,0.7,0.9"])
    if args.ppl:
        er.main(["--rows", ",".join(args.rows), "--ppl-contexts", ",".join(map(str, args.ppl))])
    report()


def finetune(args) -> None:
    """Train each method with the same short recipe (2 DeepSpeed ranks), then its perplexity on the held-out works."""
    import os
    import subprocess

    root = ROOT.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    for tag in args.methods:
        impl, row, own = FINETUNE[tag]
        out = root / FT_RUNS / tag
        if not (out / "merged" / "config.json").exists():
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--quiet", "--num_gpus", "2", "--master_port",
                   str(args.master_port), "--module", "ds_msattn.train", "--config", FT_RECIPE, f"--output_dir={out}",
                   f"--attention.implementation={impl}", *FT_OVERRIDES, *own]
            print("== " + " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=root, env=env, check=True)
        if args.ppl:
            er.main(["--rows", row, "--fine-tuned", str(out / "merged"), "--tag", tag,
                     "--ppl-contexts", ",".join(map(str, args.ppl))])
    report()


def time_rows(args) -> None:
    """One 16K window per table row (the fine-tuned ones whose merged model exists), one after the other."""
    from ds_msattn.eval.cli import main as eval_main

    calibrate_esa(ROWS)
    text = er.heldout_text()
    for key in _table_rows():
        tag, row = er._split_key(key)
        model = str(ROOT.parent / FT_RUNS / tag / "merged") if tag else "smollm2"
        if tag and not Path(model, "config.json").exists():
            print(f"== {key}: no merged model at {model}, skipped", flush=True)
            continue
        argv = er.ppl_argv(model, row, text, COST_T, 1, er.RUNS / f"time_{key}_{COST_T}.json")
        print("== ds-msattn eval " + " ".join(argv), flush=True)
        eval_main(argv)
    report()


def _forward_seconds(key: str, ppl: dict) -> tuple[float | None, float | None]:
    """The 16K forward time of a row and the perplexity of that window: from the last ``time`` run if it measured
    the row, else (time only) from the row's perplexity file."""
    path = er.RUNS / f"time_{key}_{COST_T}.json"
    if path.exists():
        r = json.loads(path.read_text())["results"][0]
        return r["seconds"], r["ppl"]
    r = ppl.get(key, {}).get(COST_T)
    return (r["seconds"] if r else None), None


def _table_rows() -> list[str]:
    """Row keys of the table: the base rows, then the fine-tuned ones."""
    return ROWS + [f"{tag}-{row}" for tag, (_, row, _) in FINETUNE.items()]


def report() -> None:
    trials = er._load_trials()
    ppl = er._load_ppl()
    rows, same_run, redone = [], [], []
    for row in _table_rows():
        tag, base = er._split_key(row)
        rec = {"row": row, "label": FT_LABELS[tag] if tag else er.ROWS[row][0]}
        for n in PPL:
            r = ppl.get(row, {}).get(n)
            rec[f"ppl_{n // 1024}k"] = round(r["ppl"], 2) if r else None
        for n in PASSKEY_TABLE:
            recs, mark = [t for t in trials.get((row, "filler"), []) if t["length"] == n], ""
            if not recs and row in PASSKEY_FALLBACK:
                recs, mark = [t for t in trials.get((PASSKEY_FALLBACK[row], "filler"), []) if t["length"] == n], " (bf16)"
            rec[f"passkey_{n // 1024}k"] = f"{sum(t['passed'] for t in recs)}/{len(recs)}{mark}" if recs else None
        rec[f"keys_per_query_{COST_T // 1024}k"] = round(keys_per_query(base, COST_T))
        rec[f"forward_{COST_T // 1024}k_s"], again = _forward_seconds(row, ppl)
        rows.append(rec)
        same_run.append(again is not None)
        first = ppl.get(row, {}).get(COST_T)
        if again is not None and first and abs(again / first["ppl"] - 1) > 5e-4:
            redone.append(f"{rec['label']}: {first['ppl']:.3f} in the table, {again:.3f} in the `time` run")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "compare_methods.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = [k for k in rows[0] if k not in ("row", "label")]
    head = [c.replace("_", " ") for c in cols]
    lines = ["# Long-context methods side by side (SmolLM2-135M, no fine-tuning, CPU)", "",
             "Written by `benchmarks/compare_methods.py report` from the trial files of `benchmarks/eval_retrieval.py`",
             "(same prompts for every row). Perplexity on the held-out works (one window per context); passkey on",
             "the filler haystack, passed/trials at depths 0.1-0.9 (\"(bf16)\": the bf16 model's trials, which matched",
             "fp32 trial by trial at 8K-32K); keys/query: mean keys a query of a 16K prefill",
             "attends to; 16K forward: seconds of the 16K perplexity window (2 threads, one job at a time; "
             + ("every row in one `time` run" if all(same_run) else
                "rows marked * in one `time` run, the others when their perplexity was measured" if any(same_run) else
                "each when its perplexity was measured") + "). Empty:",
             "not measured yet.", "",
             "| row | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(cols)]
    for r, timed in zip(rows, same_run):
        mark = "*" if timed and not all(same_run) else ""
        lines.append(f"| {r['label']}{mark} | " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    lines += ["", "S2-Attn and SF-Attn run dense attention at inference (as LongLoRA and SinkLoRA evaluate): without",
              "their fine-tune they are the dense row. The rows marked \"after the comparison fine-tune\" are one",
              f"short fine-tune per method with everything else equal (`python benchmarks/compare_methods.py finetune`):",
              f"`{FT_RECIPE}` with `{' '.join(FT_OVERRIDES[:4])}` (same data order, CRD-NTK positions, reduced LoRA,",
              "ZeRO-3 offload, 2 DeepSpeed ranks), only `attention.implementation` changed; each merged model is",
              "then evaluated as its method intends (S2/SF: dense attention with the trained RoPE; MS: the default",
              "MS attention). The row \"with plain RoPE\" is the MS fine-tune with `--positions.enabled=false` too",
              "(no CRD-NTK: the base stays the model's). Empty rows: not run yet.",
              "", "The `time` run measures each row's 16K perplexity again with the code of the day: "
              + ("it repeats every row's to 0.05%." if not redone else
                 "it repeats every row's to 0.05% except " + "; ".join(redone) + " (MS perplexities can differ"
                 " by up to 0.1% between sessions with the same code: docs/facts.md)."),
              "", "Rows: " + "; ".join(f"`{r}`: `{' '.join(er.ROWS[r][1])}`" for r in ROWS + ["dense_own"])]
    (RESULTS / "compare_methods.md").write_text("\n".join(lines) + "\n")
    _plot(rows)
    print("\n".join(lines))


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in rows:
        xs = [n for n in PPL if r[f"ppl_{n // 1024}k"] is not None]
        a.plot([x // 1024 for x in xs], [r[f"ppl_{n // 1024}k"] for n in xs], marker="o", label=r["row"])
        xs = [n for n in PASSKEY_TABLE if r[f"passkey_{n // 1024}k"]]
        acc = [int(p) / int(t) for p, t in (r[f"passkey_{n // 1024}k"].split()[0].split("/") for n in xs)]
        b.plot([x // 1024 for x in xs], acc, marker="o", label=r["row"])
    a.set(xlabel="context (K tokens)", ylabel="perplexity (held-out)", xscale="log", title="perplexity")
    b.set(xlabel="length (K tokens)", ylabel="passkey accuracy", xscale="log", ylim=(-0.05, 1.05), title="passkey")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "compare_methods.png", dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing cells of these rows, then report")
    r.add_argument("--rows", type=lambda s: s.split(","), default=ROWS)
    r.add_argument("--passkey", type=er._ints, default=PASSKEY)
    r.add_argument("--ppl", type=er._ints, default=PPL)
    r.add_argument("--haystacks", default="filler")
    f = sub.add_parser("finetune", help="the same short fine-tune per method, then its perplexity, then report")
    f.add_argument("--methods", type=lambda s: s.split(","), default=list(FINETUNE), help=",".join(FINETUNE))
    f.add_argument("--ppl", type=er._ints, default=PPL)
    f.add_argument("--master-port", type=int, default=29541)
    sub.add_parser("time", help="the 16K forward of every table row again, one after the other (one heavy job)")
    sub.add_parser("report", help="rebuild the table from the trial files")
    args = p.parse_args(argv)
    from ds_msattn.logs import setup_logging

    setup_logging()  # the libraries' progress bars and advisories stay out of the logs (the runs call eval directly)
    if args.cmd == "finetune":
        unknown = [m for m in args.methods if m not in FINETUNE]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(FINETUNE)}")
    {"run": run, "finetune": finetune, "time": time_rows}.get(args.cmd, lambda _: report())(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
