"""Streaming inference to a million tokens on SmolLM2-135M (no fine-tuning): passkey, memory, disk, speed, perplexity.

Every trial runs in its own process (so its peak RSS is its own) and writes one JSON file under
``benchmarks/results/eval_streaming/``; a trial whose file exists is skipped, so the benchmark resumes where it
stopped. ``--heavy CMD`` runs each trial through that queue command (e.g. ``/work/shared/bin/heavy``), so the
lock is held one trial at a time. ``report`` gathers the files into ``eval_streaming.{md,json,png}``.

    python benchmarks/eval_streaming.py passkey --lengths 32768,131072 --trials 5 [--heavy /work/shared/bin/heavy]
    python benchmarks/eval_streaming.py ppl --tokens 1500000 [--heavy ...]   # then its control (--native-window)
    python benchmarks/eval_streaming.py report

Set-up (``SETUP``): MS c=16 K=64 m=16 s=1 with the streaming runner (window 64 regions, summary scales 1, 16, 256
regions, beam 32, the last 16 regions always attended: ``--local-regions``), far_positions compact, score position_free, plain RoPE (every distance a query sees stays
below K*c = 1024 tokens), chunk 1024, store in float16 on disk (no host-memory budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "results"
TRIALS = RESULTS / "eval_streaming"
SETUP = dict(region_size=16, top_k=64, merge=16, sink_regions=1, chunk=1024, window_regions=64, local_regions=16,
             scales=(1, 16, 256), beam=32, far_positions="compact", score="position_free", select_per="head",
             store_dtype="float16", store_memory_gib=0.0, coarse_score="bound", model_dtype="float32")
#: trial-file prefix of each coarse_score (the runner's candidate search; "" for the first one measured) and model
#: dtype
PREFIX = {"mean": "", "bound": "bound-"}
DTYPE_PREFIX = {"float32": "", "bfloat16": "bf16-"}


def _setup(coarse: str, dtype: str, local: int) -> dict:
    return SETUP | {"coarse_score": coarse, "model_dtype": dtype, "local_regions": local}


def _prefix(coarse: str, dtype: str, local: int) -> str:
    """Trial-file prefix; ``local{n}-`` first when the runner always attends n recent regions (the files of the
    trials run before that option was the benchmark's default have no such prefix: local_regions 0)."""
    return (f"local{local}-" if local else "") + PREFIX[coarse] + DTYPE_PREFIX[dtype]


def _describe(setup: dict) -> dict:
    return setup | {"scales": list(setup["scales"])}


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(setup: dict):
    import torch

    from ds_msattn.eval.loading import EvalModelSpec, load_eval_model
    from ds_msattn.eval.recursive import RecursiveConfig, RecursiveRunner
    from ds_msattn.models import load_tokenizer

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    spec = EvalModelSpec(model="smollm2", attention="sdpa", rope="none", dtype=setup["model_dtype"])  # the runner
    tok = load_tokenizer("smollm2")  # does the attention itself
    model = load_eval_model(spec)
    cfg = RecursiveConfig(**{k: v for k, v in setup.items() if k != "model_dtype"}, store_dir=os.environ.get("STORE_DIR"))
    return tok, model, RecursiveRunner(model, cfg)


def trial_passkey(length: int, trial: int, seed: int, out: Path, setup: dict) -> None:
    from ds_msattn.eval.passkey import first_integer, passkey_keys, score
    from ds_msattn.eval.stream import passkey_chunks, spread_depths

    rss0 = _peak_rss_mib()
    tok, model, runner = _load(setup)
    rss_loaded = _rss_now_mib()
    depth = spread_depths(seed, length, TRIALS_PER[length])[trial]
    key = passkey_keys(seed * 1_000_003 + length, TRIALS_PER[length])[trial]
    samples, rss_max = [], [0.0]

    def on_chunk(done: int) -> None:
        rss_max[0] = max(rss_max[0], _rss_now_mib())
        if done % (32 * SETUP["chunk"]) == 0:
            samples.append((done, round(_rss_now_mib(), 1), round(time.perf_counter() - t0, 1)))
            print(f"passkey L={length} trial {trial}: {done} tokens, rss {samples[-1][1]} MiB, {samples[-1][2]} s",
                  file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    res = runner.run(passkey_chunks(tok, length, key, depth, SETUP["chunk"]), new_tokens=8, log=None, score=False,
                     on_chunk=on_chunk, planned_tokens=length + 8)
    text = tok.decode(res["new_tokens"])
    rec = dict(kind="passkey", length=length, trial=trial, depth=round(depth, 4), key=key, generated=text,
               found=first_integer(text), passed=score(text, key), peak_rss_mib=round(_peak_rss_mib(), 1),
               rss_before_load_mib=round(rss0, 1), rss_after_load_mib=round(rss_loaded, 1),
               max_rss_during_prefill_mib=round(rss_max[0], 1),
               store_disk_gib=round(res["store_bytes"]["disk"] / 2**30, 3),
               prefill_tokens_per_s=res["prefill_tokens_per_s"], prefill_seconds=res["prefill_seconds"],
               seconds=res["seconds"], progress=samples, store_io="preadv", setup=_describe(setup))
    runner.close()
    out.write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("progress", "setup")}), flush=True)


def trial_ppl(tokens: int, segment: int, out: Path, setup: dict) -> None:
    from ds_msattn.corpora import corpus_texts
    from ds_msattn.eval.stream import joined_ids

    tok, model, runner = _load(setup)
    ids, works = joined_ids(tok, corpus_texts("shakespeare"), tokens)
    rss_loaded = _rss_now_mib()
    n = int(ids.shape[0])
    partial = out.with_suffix(".partial.json")
    t0 = time.perf_counter()
    progress, segments = [], []

    def on_chunk(done: int) -> None:
        if done % segment == 0 or done == n:
            progress.append(dict(tokens=done, rss_mib=round(_rss_now_mib(), 1), seconds=round(time.perf_counter() - t0, 1),
                                 store_disk_gib=round(runner.store.disk_bytes / 2**30, 3)))
            partial.write_text(json.dumps(dict(tokens=n, progress=progress, segments=segments)))
            print(f"ppl: {progress[-1]}", file=sys.stderr, flush=True)

    chunks = (ids[a : a + SETUP["chunk"]] for a in range(0, n, SETUP["chunk"]))
    res = runner.run(chunks, log=None, segment_tokens=segment, on_chunk=on_chunk, planned_tokens=n,
                     on_segment=segments.append)
    rec = dict(kind="ppl", tokens=n, works=works, segment=segment, ppl=res["ppl"], segments=res["segments"],
               peak_rss_mib=round(_peak_rss_mib(), 1), rss_after_load_mib=round(rss_loaded, 1),
               store_disk_gib=round(res["store_bytes"]["disk"] / 2**30, 3),
               prefill_tokens_per_s=res["prefill_tokens_per_s"], seconds=res["seconds"], progress=progress,
               store_io="preadv", setup=_describe(setup))
    runner.close()
    out.write_text(json.dumps(rec, indent=1))
    partial.unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("progress", "setup", "segments")}), flush=True)


def trial_native(tokens: int, segment: int, window: int, out: Path, dtype: str) -> None:
    """The control of the perplexity curve: the same tokens read by the dense model in independent windows of
    ``window`` tokens (its native range), NLL per segment like the streaming runner's. A segment's ppl here is
    how hard its text is; the streaming ppl divided by it is what the long streamed context adds or costs."""
    import torch

    from ds_msattn.corpora import corpus_texts
    from ds_msattn.eval.loading import EvalModelSpec, load_eval_model
    from ds_msattn.eval.ppl import window_nll
    from ds_msattn.eval.stream import joined_ids
    from ds_msattn.models import load_tokenizer

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    tok = load_tokenizer("smollm2")
    model = load_eval_model(EvalModelSpec(model="smollm2", attention="sdpa", rope="none", dtype=dtype))
    ids, works = joined_ids(tok, corpus_texts("shakespeare"), tokens)
    n = int(ids.shape[0])
    sums, counts = [0.0] * math.ceil(n / segment), [0] * math.ceil(n / segment)
    t0 = time.perf_counter()
    for a in range(0, n, window):  # a window lies inside one segment; its first token has no context: unscored
        total, count = window_nll(model, ids[a : a + window])
        sums[a // segment] += total
        counts[a // segment] += count
        if (a // window) % 16 == 0:
            print(f"native: {min(n, a + window)} tokens, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    segs = [dict(start=i * segment, tokens=c, nll=sm / c, ppl=math.exp(sm / c))
            for i, (sm, c) in enumerate(zip(sums, counts)) if c]
    rec = dict(kind="ppl_native", tokens=n, window=window, works=works, segment=segment, segments=segs,
               ppl=math.exp(sum(sums) / sum(counts)), seconds=round(time.perf_counter() - t0, 1),
               tokens_per_s=round(n / (time.perf_counter() - t0), 1), model_dtype=dtype)
    out.write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("works", "segments")}), flush=True)


def _work_at(works: list[dict], start: int) -> str:
    """Name of the work the token ``start`` belongs to."""
    return [w["name"] for w in works if w["start"] <= start][-1]


TRIALS_PER: dict[int, int] = {}


def _spawn(heavy: str | None, args: list[str]) -> int:
    cmd = ([heavy] if heavy else []) + [sys.executable, str(Path(__file__).resolve())] + args
    print("run:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _group(rec: dict) -> tuple[str, str, str, str]:
    """(model dtype, coarse score, local regions, store reads) of a trial record, as strings (records from before
    these existed: float32, mean, 0, mmap)."""
    s = rec["setup"]
    return (s.get("model_dtype", "float32"), s.get("coarse_score", "mean"), str(s.get("local_regions", 0)),
            rec.get("store_io", "mmap"))


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(p.read_text()) for p in sorted(TRIALS.glob("*.json")) if not p.name.endswith(".partial.json")]
    partials = {p.name: json.loads(p.read_text()) for p in TRIALS.glob("*.partial.json")}
    pk = sorted([r for r in recs if r["kind"] == "passkey"], key=lambda r: (r["length"], r["trial"]))
    pp = [r for r in recs if r["kind"] == "ppl"]
    native = {(r["tokens"], r["model_dtype"]): r for r in recs if r["kind"] == "ppl_native"}
    import torch
    import transformers

    s = SETUP
    lines = ["# Streaming inference on SmolLM2-135M (no fine-tuning): passkey, memory, disk, speed, perplexity", "",
             f"CPU ({os.cpu_count()} cores, shared with other jobs; each trial its own process, {os.environ.get('THREADS', '2')} "
             f"threads), torch {torch.__version__}, transformers {transformers.__version__}, plain RoPE "
             f"(8K native). Streaming runner: MS c={s['region_size']} K={s['top_k']} m={s['merge']} s={s['sink_regions']}, "
             f"chunk {s['chunk']}, window {s['window_regions']} regions, summary scales {list(s['scales'])} regions, beam "
             f"{s['beam']}, far_positions {s['far_positions']}, score {s['score']}, select_per {s['select_per']}; store "
             f"{s['store_dtype']} on disk (memory budget {s['store_memory_gib']} GiB).", "",
             "Model: the dtype of SmolLM2's weights and activations (`--dtype`; the runner's selection summaries are "
             "fp32 either way, its attention runs in the model's dtype; bfloat16 matmuls use the CPU's AMX units). "
             "Coarse score: how the candidate search ranks a coarse group (runner option `coarse_score`): `mean` "
             "(query . the mean of its regions' summaries) or `bound` (an upper bound of its regions' scores, from the "
             "elementwise max and min of their summaries). Store reads: `mmap` for trials run before the store read its "
             "files with preadv (their RSS counts mapped store pages), `preadv` after.", "",
             "## Passkey (depths spread: trial i of n at a random depth in [i/n, (i+1)/n); 8 greedy tokens)", "",
             "| model | coarse score | local regions | store reads | length | passed | peak RSS MiB (max over trials) | RSS after load MiB | "
             "store on disk GiB | prefill tokens/s (mean) | prefill s (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_len: dict[tuple, list[dict]] = {}
    for r in pk:
        by_len.setdefault(_group(r) + (r["length"],), []).append(r)
    for (*g, L), rs in sorted(by_len.items()):
        lines.append(f"| {' | '.join(g)} | {L} | {sum(r['passed'] for r in rs)}/{len(rs)} | {max(r['peak_rss_mib'] for r in rs):.0f} | "
                     f"{max(r['rss_after_load_mib'] for r in rs):.0f} | {max(r['store_disk_gib'] for r in rs):.2f} | "
                     f"{sum(r['prefill_tokens_per_s'] for r in rs) / len(rs):.0f} | "
                     f"{sum(r['prefill_seconds'] for r in rs) / len(rs):.0f} |")
    if pk:  # linear time: seconds per 32 chunks along the longest trial (bounded per-chunk work)
        longest = max(pk, key=lambda r: (r["length"], -r["trial"]))
        prog = longest.get("progress") or []
        if len(prog) > 1:
            steps = [round(b[2] - a[2], 1) for a, b in zip(prog, prog[1:])]
            lines += ["", f"Time per {32 * s['chunk']} tokens along the longest trial ({longest['length']} tokens, trial "
                          f"{longest['trial']}): first {prog[0][2]} s, then {steps} s; RSS sampled at those points: "
                          f"{[p[1] for p in prog]} MiB."]
    lines += ["", "| model | coarse score | local regions | store reads | length | trial | depth | key | generated | passed |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(_group(r))} | {r['length']} | {r['trial']} | {r['depth']} | {r['key']} | {r['generated']!r} | "
              f"{r['passed']} |" for r in sorted(pk, key=lambda r: (_group(r), r["length"], r["trial"]))]
    if pp:
        lines += ["", "## Perplexity per 32K segment over the joined corpus", "",
                  "Works in name order, each after a blank line. Native control: the same tokens read by the dense model "
                  "in independent windows of its native length (a window's first token unscored): how hard each "
                  "segment's text is. Stream / native below 1: the streamed context helps; the last column normalises "
                  "that ratio by the first segment's, so text difficulty cancels and what remains is the position.", ""]
        for r in pp:
            first = r["segments"][0]["ppl"]
            worst = max(r["segments"], key=lambda x: x["ppl"])
            ctl = native.get((r["tokens"], _group(r)[0]))
            lines += [f"{' '.join(_group(r)[:2])}, local regions {_group(r)[2]}: {r['tokens']} tokens, overall ppl {r['ppl']:.2f}, peak RSS {r['peak_rss_mib']:.0f} MiB, store "
                      f"{r['store_disk_gib']:.2f} GiB, {r['prefill_tokens_per_s']:.0f} tokens/s; first segment "
                      f"{first:.2f}, worst segment {worst['ppl']:.2f} at {worst['start']} ({worst['ppl'] / first:.2f}x the first)."]
            works = r["works"] if isinstance(r["works"], list) else None
            head = "| segment start | work there | tokens | ppl | ratio to first |"
            if ctl:
                cseg = {g["start"]: g["ppl"] for g in ctl["segments"]}
                rel = [g["ppl"] / cseg[g["start"]] for g in r["segments"]]
                norm = [x / rel[0] for x in rel]
                j = max(range(len(norm)), key=norm.__getitem__)
                lines += ["", f"Native control (windows of {ctl['window']} tokens, {ctl['tokens_per_s']:.0f} tokens/s): "
                              f"overall ppl {ctl['ppl']:.2f}. Stream / native: first segment {rel[0]:.3f}, worst "
                              f"{rel[j]:.3f} at {r['segments'][j]['start']} (**{norm[j]:.2f}x the first**); mean "
                              f"{sum(rel) / len(rel):.3f}."]
                head += " native ppl | stream / native | normalised to first |"
            lines += ["", head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
            for i, g in enumerate(r["segments"]):
                row = (f"| {g['start']} | {_work_at(works, g['start']) if works else ''} | {g['tokens']} | {g['ppl']:.2f} | "
                       f"{g['ppl'] / first:.2f} |")
                if ctl:
                    row += f" {cseg[g['start']]:.2f} | {rel[i]:.3f} | {norm[i]:.2f} |"
                lines.append(row)
    for name, p in partials.items():
        lines += ["", f"Unfinished (still running or stopped): {name}: reached {p['progress'][-1] if p['progress'] else 'nothing'} "
                      f"of {p['tokens']} tokens."]
        segs = p.get("segments") or []
        if segs:
            first = segs[0]["ppl"]
            lines += ["", "| segment start | tokens | ppl | ratio to first |", "| --- | --- | --- | --- |"]
            lines += [f"| {g['start']} | {g['tokens']} | {g['ppl']:.2f} | {g['ppl'] / first:.2f} |" for g in segs]
    lines += ["", "Commands: `python benchmarks/eval_streaming.py passkey --lengths L --trials N --heavy /work/shared/bin/heavy`, "
              "`python benchmarks/eval_streaming.py ppl --tokens N ...`, `python benchmarks/eval_streaming.py report`.", ""]
    (RESULTS / "eval_streaming.md").write_text("\n".join(lines))
    (RESULTS / "eval_streaming.json").write_text(json.dumps(dict(setup=_describe(SETUP), passkey=pk, ppl=pp,
                                                                 ppl_native=list(native.values())), indent=1))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    groups = sorted({g[:-1] for g in by_len})  # by_len keys: a trial's group, then its length
    if groups:
        Ls = sorted({g[-1] for g in by_len})
        width = 0.8 / len(groups)
        ax = axes[1]
        for j, g in enumerate(groups):
            mine = [L for L in Ls if g + (L,) in by_len]
            acc = [sum(r["passed"] for r in by_len[g + (L,)]) / len(by_len[g + (L,)]) for L in mine]
            axes[0].bar([Ls.index(L) + j * width for L in mine], acc, width, label=" ".join(g))
            ax.plot([L // 1024 for L in mine], [max(r["peak_rss_mib"] for r in by_len[g + (L,)]) for L in mine], "o-",
                    label=f"peak RSS MiB ({' '.join(g)})")
        axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(Ls))], [f"{L // 1024}K" for L in Ls])
        axes[0].set_ylim(0, 1)
        axes[0].legend(fontsize=7)
        axes[0].set_title("passkey accuracy")
        disk = {L: max(r["store_disk_gib"] for g, rs in by_len.items() if g[-1] == L for r in rs) for L in Ls}
        ax.plot([L // 1024 for L in Ls], [1024 * disk[L] for L in Ls], "s--", label="store on disk MiB")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("length (K tokens)")
        ax.legend(fontsize=7)
        ax.set_title("memory and disk")
    for r in pp:
        axes[2].plot([g["start"] / 1024 for g in r["segments"]], [g["ppl"] for g in r["segments"]], ".-", label="stream")
        ctl = native.get((r["tokens"], _group(r)[0]))
        if ctl:
            axes[2].plot([g["start"] / 1024 for g in ctl["segments"]], [g["ppl"] for g in ctl["segments"]], ".:",
                         label=f"dense, windows of {ctl['window']}")
            axes[2].legend(fontsize=7)
        axes[2].set_xlabel("segment start (K tokens)")
        axes[2].set_title("perplexity per 32K segment")
    fig.tight_layout()
    fig.savefig(RESULTS / "eval_streaming.png", dpi=100)
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("passkey")
    p.add_argument("--lengths", required=True)
    p.add_argument("--trials", required=True, help="one number, or one per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heavy", default=None)
    p.add_argument("--max-new", type=int, default=None, help="run at most this many missing trials now")
    q = sub.add_parser("ppl")
    q.add_argument("--tokens", type=int, default=1_500_000)
    q.add_argument("--segment", type=int, default=32768)
    q.add_argument("--native-window", type=int, default=8192,
                   help="the control: the dense model over the same tokens in windows of this many (0: none)")
    q.add_argument("--heavy", default=None)
    t = sub.add_parser("trial")
    t.add_argument("--kind", required=True)
    t.add_argument("--length", type=int, default=0)
    t.add_argument("--trial", type=int, default=0)
    t.add_argument("--trials", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--segment", type=int, default=32768)
    t.add_argument("--window", type=int, default=8192)
    t.add_argument("--out", required=True)
    for x in (p, q, t):
        x.add_argument("--coarse-score", default=SETUP["coarse_score"], choices=list(PREFIX),
                       help="the runner's coarse_score (trial files of 'bound' are prefixed 'bound-')")
        x.add_argument("--dtype", default=SETUP["model_dtype"], choices=list(DTYPE_PREFIX),
                       help="the model's dtype (trial files of bfloat16 are prefixed 'bf16-')")
        x.add_argument("--local-regions", type=int, default=SETUP["local_regions"],
                       help="recent regions always attended (trial files of n > 0 are prefixed 'local{n}-')")
    sub.add_parser("report")
    a = ap.parse_args()
    from ds_msattn.logs import setup_logging

    setup_logging()  # the libraries' progress bars and advisories stay out of the trial logs
    window = a.native_window if a.cmd == "ppl" else a.window if a.cmd == "trial" and a.kind == "native" else 0
    if window and a.segment % window:  # a native window must lie inside one segment
        ap.error(f"--segment ({a.segment}) must be a multiple of the native window ({window})")
    TRIALS.mkdir(parents=True, exist_ok=True)
    if a.cmd == "report":
        report()
        return 0
    if a.cmd == "trial":
        TRIALS_PER[a.length] = a.trials
        if a.kind == "passkey":
            trial_passkey(a.length, a.trial, a.seed, Path(a.out), _setup(a.coarse_score, a.dtype, a.local_regions))
        elif a.kind == "native":
            trial_native(a.length, a.segment, a.window, Path(a.out), a.dtype)
        else:
            trial_ppl(a.length, a.segment, Path(a.out), _setup(a.coarse_score, a.dtype, a.local_regions))
        return 0
    if a.cmd == "passkey":
        lengths = [int(x) for x in a.lengths.split(",")]
        trials = [int(x) for x in a.trials.split(",")]
        trials = trials * len(lengths) if len(trials) == 1 else trials
        pre = _prefix(a.coarse_score, a.dtype, a.local_regions)
        todo = [(L, n, i) for L, n in zip(lengths, trials) for i in range(n)
                if not (TRIALS / f"{pre}passkey-{L}-{i}-of-{n}.json").exists()]
        for L, n, i in todo[: a.max_new]:
            out = TRIALS / f"{pre}passkey-{L}-{i}-of-{n}.json"
            rc = _spawn(a.heavy, ["trial", "--kind", "passkey", "--length", str(L), "--trial", str(i), "--trials",
                                  str(n), "--seed", str(a.seed), "--out", str(out), "--coarse-score", a.coarse_score,
                                  "--dtype", a.dtype, "--local-regions", str(a.local_regions)])
            if rc:
                print(f"trial {out.name} failed with exit code {rc}", flush=True)
        report()
        return 0
    out = TRIALS / f"{_prefix(a.coarse_score, a.dtype, a.local_regions)}ppl-{a.tokens}.json"
    if not out.exists():
        _spawn(a.heavy, ["trial", "--kind", "ppl", "--length", str(a.tokens), "--segment", str(a.segment), "--out", str(out),
                         "--coarse-score", a.coarse_score, "--dtype", a.dtype,
                         "--local-regions", str(a.local_regions)])
    ctl = TRIALS / f"{DTYPE_PREFIX[a.dtype]}ppl-native{a.native_window}-{a.tokens}.json"
    if a.native_window and not ctl.exists():
        _spawn(a.heavy, ["trial", "--kind", "native", "--length", str(a.tokens), "--segment", str(a.segment),
                         "--window", str(a.native_window), "--out", str(ctl), "--dtype", a.dtype])
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
