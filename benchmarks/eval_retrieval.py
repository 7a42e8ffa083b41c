"""Passkey retrieval far past SmolLM2's 8K context: which MS attention options let a selected needle be read.

Each row is one model set-up (attention, options, RoPE); each (row, haystack) runs ``ds-msattn eval passkey`` with
``--diagnose`` (needle recall: did the answering block select a region holding the key) and ``--trials-file``, so
every finished trial is on disk at once and a rerun of the same command resumes where it stopped. Prompts are
shared across rows (keys, depths and corpus offsets are seeded by length). ``--report`` (also run at the end)
writes benchmarks/results/eval_retrieval.md, .json and a heatmap .png (length x depth, per row).

    python benchmarks/eval_retrieval.py --rows today,compact_pf --lengths 16384,32768 --trials 1 \\
        --depths 0.1,0.3,0.5,0.7,0.9 --haystacks filler,corpus
    python benchmarks/eval_retrieval.py --report
    python benchmarks/eval_retrieval.py --rows compact_pf --fine-tuned runs/main_job/merged --lengths 16384,32768

``--fine-tuned DIR`` runs the rows on a fine-tuned model (e.g. the main job's merged export) instead of the base
model; its trial files and rows are named ``TAG-<row>`` (``--tag``, default ``tuned``; the tags are in ``TAGS``).

Heavy: on 2 CPU cores a 32K MS trial takes minutes (dense attention several times more); run one such job at a
time on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "eval_retrieval"
MS = ["--attn", "ms_attention", "--region-size", "16", "--top-k", "64", "--merge", "16", "--sink-regions", "1"]


def _ms(far="exact", score="rope", per="head", *more):
    """MS rows state every option, so they do not follow the package's default; a size flag of ``MS`` in ``more``
    (``--top-k 128``) replaces its value there."""
    sizes, more = list(MS), list(more)
    for flag in [f for f in more if f in MS]:
        i = more.index(flag)
        sizes[sizes.index(flag) + 1] = more[i + 1]
        del more[i : i + 2]
    return sizes + ["--far-positions", far, "--score", score, "--select-per", per, *more]


#: name -> (label, eval arguments). "today" is the rule as the README ran it last round (exact positions, rope
#: scores, CRD-NTK alpha 4 per length); "dense_dynamic" the baseline users would pick.
ROWS = {
    "dense_dynamic": ("dense + dynamic NTK (factor 4)", ["--attn", "sdpa", "--rope", "dynamic", "--rope-factor", "4"]),
    # the baseline past 32K in bf16: fp32 dense takes ~20 min per 64K prompt and ~65 min per 128K one on 2 cores;
    # the same prompts at 32K in both dtypes check that bf16 does not change the outcome
    "dense_dynamic_bf16": ("dense + dynamic NTK (factor 4), bf16 model",
                           ["--attn", "sdpa", "--rope", "dynamic", "--rope-factor", "4", "--dtype", "bfloat16"]),
    "dense_own": ("dense attention, the model's own RoPE (how S2-Attn and SF-Attn models are evaluated)",
                  ["--attn", "sdpa"]),
    "today": ("MS exact, rope scores, CRD-NTK alpha 4 (today)", _ms("exact", "rope", "head", "--rope", "crd-ntk",
                                                                    "--rope-factor", "4")),
    "exact_plain": ("MS exact, rope scores, plain RoPE", _ms()),
    "compact": ("MS compact, rope scores, plain RoPE", _ms("compact")),
    "pf": ("MS exact, position_free, plain RoPE", _ms("exact", "position_free")),
    "compact_pf": ("MS compact + position_free, plain RoPE", _ms("compact", "position_free")),
    "capped2k_pf": ("MS capped W=2048 + position_free", _ms("capped", "position_free", "head", "--far-window", "2048")),
    "capped6k_pf": ("MS capped W=6144 + position_free", _ms("capped", "position_free", "head", "--far-window", "6144")),
    "grouped_pf": ("MS grouped W=2048 G=8 + position_free", _ms("grouped", "position_free", "head", "--far-window",
                                                                "2048", "--far-group", "8")),
    "compact_pf_kv": ("MS compact + position_free + kv_group", _ms("compact", "position_free", "kv_group")),
    "compact_pf_k128": ("MS compact + position_free, K=128 (2048 keys per query)",
                        _ms("compact", "position_free", "head", "--top-k", "128")),
    "h2o": ("dense + dynamic NTK (factor 4), H2O cache 1024 (recent 512, chunks of 64)",
            ["--attn", "sdpa", "--rope", "dynamic", "--rope-factor", "4", "--kv-cache", "h2o", "--kv-budget", "1024",
             "--recent", "512", "--kv-chunk", "64"]),
    # ESA (docs/other_methods.md): projections fitted by `ds-msattn esa-calibrate` (benchmarks/compare_methods.py
    # runs it first) for the local window of the row; the paper's sizes, and a budget matched to MS (about 1K keys)
    "esa": ("ESA, paper sizes (128 initial + 2048 selected + 4096 local tokens, chunks of 512), rank 32",
            ["--attn", "esa_attention", "--esa-projections", "runs/esa/smollm2_w4096"]),
    "esa_1k": ("ESA, 16 initial + 512 selected + 512 local tokens, chunks of 256, rank 32",
               ["--attn", "esa_attention", "--esa-top-k", "512", "--esa-sink-tokens", "16", "--esa-local-window", "512",
                "--esa-chunk", "256", "--esa-projections", "runs/esa/smollm2_w512"]),
    "compact_pf_s4": ("MS compact + position_free, 4 sink regions", _ms("compact", "position_free", "head",
                                                                      "--sink-regions", "4")),
    # smaller query blocks, same 1024 keys per query: each query region (16 tokens) ranks (K - m) / m history regions
    # of its own (3 at m=16, 7 at m=8, 15 at m=4), so the region holding the question gets more picks
    "compact_pf_m8": ("MS compact + position_free, m=8 (blocks of 128 tokens)",
                      _ms("compact", "position_free", "head", "--merge", "8")),
    "compact_pf_m4": ("MS compact + position_free, m=4 (blocks of 64 tokens)",
                      _ms("compact", "position_free", "head", "--merge", "4")),
}


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _floats(text):
    return [float(x) for x in text.split(",") if x]


#: fine-tuned models (``--fine-tuned DIR --tag TAG``): TAG -> how the model was trained. Their rows are keyed
#: ``TAG-<row>`` (tags have no "-").
TAGS = {
    "tuned": "fine-tuned (main job's merged model)",
    "tuned_ntk": "fine-tuned by the main job when its recipe had CRD-NTK positions (2 steps at 16K, 2026-12-05)",
    "fts2": "after the comparison fine-tune with S2-Attn (compare_methods.py finetune)",
    "ftsf": "after the comparison fine-tune with SF-Attn (compare_methods.py finetune)",
    "ftms": "after the comparison fine-tune with MS attention (compare_methods.py finetune)",
    "ftmsp": "after the comparison fine-tune with MS attention and plain RoPE (compare_methods.py finetune)",
}


def _split_key(key: str) -> tuple[str | None, str]:
    """``row`` -> (None, row); ``TAG-row`` -> (TAG, row)."""
    tag, sep, row = key.partition("-")
    return (tag, row) if sep else (None, key)


def _label(key: str) -> str:
    """The report's label of a row key (``row`` or ``TAG-row``)."""
    tag, row = _split_key(key)
    return f"{TAGS[tag]}: {ROWS[row][0]}" if tag else ROWS[row][0]


def _row_key(row: str, args) -> str:
    """The key a run's files are named by: the row, ``TAG-<row>`` on a fine-tuned model."""
    return f"{args.tag}-{row}" if args.fine_tuned else row


def _row_keys(present) -> list[str]:
    """Row keys in ROWS order, each base row followed by its fine-tuned runs (in TAGS order)."""
    return [k for r in ROWS for k in (r, *(f"{t}-{r}" for t in TAGS)) if k in present]


def _record_command() -> None:
    with open(RUNS / "commands.txt", "a") as f:
        f.write(f"python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:]) + "\n")


def run(args) -> None:
    from ds_msattn.eval.cli import main as eval_main

    RUNS.mkdir(parents=True, exist_ok=True)
    _record_command()
    for row in args.rows:
        if row not in ROWS:
            raise SystemExit(f"--rows: unknown row {row!r}; known: {', '.join(ROWS)}")
        for haystack in args.haystacks:
            stem = RUNS / f"{_row_key(row, args)}_{haystack}"
            argv = ["passkey", "--model", args.fine_tuned or args.model, *ROWS[row][1], "--lengths", ",".join(map(str, args.lengths)),
                    "--trials", str(args.trials), "--haystack", haystack, "--trials-file", f"{stem}.jsonl",
                    "--output", f"{stem}_{'-'.join(map(str, args.lengths))}.json", "--seed", str(args.seed)]
            if args.depths:
                argv += ["--depths", ",".join(map(str, args.depths))]
            if "ms_attention" in ROWS[row][1]:  # needle recall is read from the MS selection
                argv.append("--diagnose")
            print("== ds-msattn eval " + shlex.join(argv), flush=True)
            eval_main(argv)
    report()


def heldout_text() -> Path:
    """The held-out works of the corpus haystack joined into one file (perplexity windows cross work boundaries)."""
    from ds_msattn.corpora import corpus_texts
    from ds_msattn.eval.passkey import HELD_OUT_WORKS

    texts = corpus_texts("shakespeare")
    names = sorted(texts)[-HELD_OUT_WORKS:][::-1]
    path = RUNS / "heldout_works.txt"
    path.write_text("\n\n".join(texts[n] for n in names))
    return path


def ppl_argv(model: str, row: str, text: Path, context: int, windows: int, out: Path) -> list[str]:
    """``ds-msattn eval`` arguments of one row's perplexity on the held-out text at one context."""
    return ["ppl", "--model", model, *ROWS[row][1], "--text-file", str(text), "--context", str(context),
            "--max-windows", str(windows), "--output", str(out)]


def run_ppl(args) -> None:
    from ds_msattn.eval.cli import main as eval_main

    RUNS.mkdir(parents=True, exist_ok=True)
    _record_command()
    text = heldout_text()
    for row in args.rows:
        for ctx in args.ppl_contexts:
            out = RUNS / f"ppl_{_row_key(row, args)}_{ctx}.json"
            if out.exists():
                continue  # resume: one JSON per (row, context)
            argv = ppl_argv(args.fine_tuned or args.model, row, text, ctx, args.ppl_windows, out)
            print("== ds-msattn eval " + shlex.join(argv), flush=True)
            eval_main(argv)
    report()


def _load_ppl() -> dict[str, dict[int, dict]]:
    """row -> context -> that window's result record (ppl, windows, seconds) from the ppl_*.json files."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(RUNS.glob("ppl_*.json")):
        rep = json.loads(path.read_text())
        row = path.stem[len("ppl_"):].rsplit("_", 1)[0]
        for r in rep["results"]:
            out.setdefault(row, {})[r["context"]] = r
    return out


def _load_trials() -> dict[tuple[str, str], list[dict]]:
    out = {}
    for path in sorted(RUNS.glob("*.jsonl")):
        row, haystack = path.stem.rsplit("_", 1)
        out[(row, haystack)] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _first_decode(trial):
    """Needle recall of the first decoded token (None without a diagnosis or a decode step)."""
    steps = trial.get("needle", {}).get("decode_recall") or []
    return steps[0] if steps else None


def _recall_by_outcome(trials) -> list[str]:
    """Mean needle recall of passed against missed trials, per row and haystack with both outcomes diagnosed."""
    out = []
    for (r, haystack), recs in sorted(trials.items()):
        recs = [t for t in recs if _first_decode(t) is not None]
        groups = {ok: [t for t in recs if t["passed"] == ok] for ok in (True, False)}
        if not (groups[True] and groups[False]):
            continue
        cells = [f"{len(g)}: {_mean([t['needle']['prefill_recall'] for t in g]):.2f} / "
                 f"{_mean([_first_decode(t) for t in g]):.2f}" for g in (groups[True], groups[False])]
        out.append(f"| {_label(r)} | {haystack} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["## Needle recall of passed and missed trials", "",
            "Mean needle recall (prefill / first decoded token) over the trials that passed and those that missed,",
            "for rows with both; the count first.", "",
            "| row | haystack | passed | missed |", "| --- | --- | --- | --- |"] + out + [""]


def report() -> None:
    trials = _load_trials()
    lengths = sorted({t["length"] for recs in trials.values() for t in recs})
    table = {}
    lines = [
        "# Passkey retrieval past the native context (SmolLM2-135M; rows marked fine-tuned use the main job's model)",
        "",
        "Written by `benchmarks/eval_retrieval.py` from the trial files in `benchmarks/results/eval_retrieval/`",
        "(one JSON line per trial: key, depth, haystack offset, generated text, needle recall). Cells: passed/trials,",
        "then the needle recall in brackets: the share of (layer, query head) pairs that selected a region holding the",
        "key sentence, first for the block that answers (prefill), then for the first decoded token (the per-token",
        "decode rule: it writes the answer's first digit). Greedy decoding, exact match of the first integer generated.",
        "MS attention is c16 K64 m16 s1 (1024 keys per query) in every MS row. Measured on this project's 2-core CPU",
        "machine (fp32 unless the row says bf16), with other work sharing the cores (accuracy does not depend on it;",
        "time per trial does).",
        "",
    ]
    for haystack in ("filler", "corpus"):
        rows = _row_keys({r for r, h in trials if h == haystack})
        if not rows:
            continue
        lines += [f"## Haystack: {haystack}", "", "| row | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for r in rows:
            cells = []
            for n in lengths:
                recs = [t for t in trials[(r, haystack)] if t["length"] == n]
                if not recs:
                    cells.append("")
                    continue
                passed = sum(t["passed"] for t in recs)
                recall = _mean([t["needle"]["prefill_recall"] for t in recs if "needle" in t])
                first = _mean([_first_decode(t) for t in recs if _first_decode(t) is not None])
                cell = f"{passed}/{len(recs)}" + (f" ({recall:.2f}" if recall is not None else "")
                cell += (f", {first:.2f})" if first is not None else ")") if recall is not None else ""
                cells.append(cell)
                table.setdefault(r, {}).setdefault(haystack, {})[str(n)] = dict(
                    passed=passed, trials=len(recs), needle_recall=recall, needle_recall_first_decode=first,
                    seconds_mean=round(sum(t["seconds"] for t in recs) / len(recs), 1))
            lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _recall_by_outcome(trials)
    ppl = _load_ppl()
    if ppl:
        contexts = sorted({c for v in ppl.values() for c in v})
        lines += ["## Perplexity on the held-out works (joined), non-overlapping windows", "",
                  "| row | " + " | ".join(f"{c // 1024}K" for c in contexts) + " |", "| --- |" + " --- |" * len(contexts)]
        for r in _row_keys(ppl):
            if r in ppl:
                lines.append(f"| {_label(r)} | " + " | ".join(
                    f"{ppl[r][c]['ppl']:.2f} ({ppl[r][c]['windows']}w)" if c in ppl[r] else "" for c in contexts) + " |")
                table.setdefault(r, {})["ppl"] = {str(c): ppl[r][c]["ppl"] for c in ppl[r]}
        lines.append("")
    lines += ["## Rows", ""] + [f"- `{r}`: {label}: `{' '.join(a)}`" for r, (label, a) in ROWS.items()
                                if any(_split_key(k)[1] == r for k in table)]
    lines += ["", "## Every trial", "",
              "| row | haystack | length | depth | key | generated | passed | needle (prefill) | needle (1st decode) | s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (r, haystack), recs in sorted(trials.items()):
        for t in recs:
            needle = t["needle"]["prefill_selected"] if "needle" in t else ""
            first = "" if _first_decode(t) is None else f"{_first_decode(t):.2f}"
            generated = t["generated"].replace("|", "\\|").replace("\n", "\\n")
            lines.append(f"| {r} | {haystack} | {t['length']} | {t['depth']} | {t['key']} | `{generated}` | "
                         f"{'yes' if t['passed'] else 'no'} | {needle} | {first} | {t['seconds']:.0f} |")
    commands = RUNS / "commands.txt"
    if commands.exists():
        lines += ["", "## Commands (from the repository root)", "", "```", commands.read_text().strip(), "```"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_retrieval.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "eval_retrieval.json").write_text(json.dumps({"rows": {r: _label(r) for r in table}, "results": table},
                                                            indent=1))
    _heatmap(trials, lengths)
    print("\n".join(lines))


def _heatmap(trials, lengths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(trials)
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(2.2 * len(keys) + 1, 3.2), squeeze=False)
    bins = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0001]
    for ax, key in zip(axes[0], keys):
        grid = [[float("nan")] * len(lengths) for _ in range(len(bins) - 1)]
        for j, n in enumerate(lengths):
            for i in range(len(bins) - 1):
                recs = [t["passed"] for t in trials[key] if t["length"] == n and bins[i] <= t["depth"] < bins[i + 1]]
                if recs:
                    grid[i][j] = sum(recs) / len(recs)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths], fontsize=7)
        ax.set_yticks(range(len(bins) - 1), ["0-.2", ".2-.4", ".4-.6", ".6-.8", ".8-1"], fontsize=7)
        ax.set_title(f"{key[0]}\n{key[1]}", fontsize=7)
    axes[0][0].set_ylabel("depth")
    fig.suptitle("passkey accuracy (green = pass)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "eval_retrieval.png", dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=lambda s: s.split(","), default=["today", "compact_pf"])
    p.add_argument("--lengths", type=_ints, default=[16384, 32768])
    p.add_argument("--depths", type=_floats, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=1, help="trials per depth")
    p.add_argument("--haystacks", type=lambda s: s.split(","), default=["filler"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fine-tuned", default=None, metavar="DIR",
                   help="run the rows on this fine-tuned model directory (rows named TAG-<row>)")
    p.add_argument("--tag", default="tuned", choices=sorted(TAGS), help="how the --fine-tuned model was trained")
    p.add_argument("--ppl-contexts", type=_ints, default=None,
                   help="instead of passkey: perplexity at these contexts on the held-out works, e.g. 4096,32768")
    p.add_argument("--ppl-windows", type=int, default=1, help="windows per context (perplexity)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the trial files")
    args = p.parse_args(argv)
    from ds_msattn.logs import setup_logging

    setup_logging()  # the libraries' progress bars and advisories stay out of the trial logs
    if args.report:
        report()
    elif args.ppl_contexts:
        run_ppl(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
