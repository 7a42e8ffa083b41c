"""MS attention (torch path) against causal SDPA on CPU: time, peak memory and FLOP ratio.

fp32, B=1, Hq=8, Hkv in {8, 2}, D=64, T from 4K to 32K, forward and forward+backward. Every measurement runs
in a fresh subprocess so that its peak RSS is its own: ``peak`` is the process' maximum resident set,
``extra`` that peak minus the resident set measured after the inputs were made (what the attention itself
needed). Times are medians of ``--repeats`` runs after one warm-up (one run at 32K for SDPA, which takes
about half a minute per forward+backward here).

    python benchmarks/attention.py                      # full table, writes benchmarks/results/attention_cpu.*
    python benchmarks/attention.py --lengths 4096 --quick
    python benchmarks/attention.py --profile 32768 --hkv 2   # where the time goes: attention_cpu_profile.txt
    python benchmarks/attention.py --lengths 16384 --hkv 2 --impls sdpa,c16-K64-m16,c16-K64-m16-model
                                        # what the model default options (compact, position_free) cost
    python benchmarks/attention.py --tiles --repeats 5   # the flash kernel per query head vs per kv group
    python benchmarks/attention.py --lengths 32768 --hkv 2 --impls sdpa,c16-K64-m16-model,c16-K64-m16-model-kv
                                        # the same with one selection per kv head (select_per="kv_group")
    python benchmarks/attention.py --lengths 16384,32768 --hkv 2 --impls sdpa,c16-K64-m16-model,c16-K64-m4-model \
        --out benchmarks/results/attention_cpu_merge   # smaller query blocks (m=4), same 1024 keys per query

Results: ``benchmarks/results/attention_cpu.{md,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PARAMS = {
    "c16-K64-m16": dict(region_size=16, top_k=64, merge=16, sink_regions=1),
    "c16-K512-m128": dict(region_size=16, top_k=512, merge=128, sink_regions=1),
    "c16-K64-m16-model": dict(region_size=16, top_k=64, merge=16, sink_regions=1),
    "c16-K64-m16-model-kv": dict(region_size=16, top_k=64, merge=16, sink_regions=1),
    "c16-K64-m4-model": dict(region_size=16, top_k=64, merge=4, sink_regions=1),
}
#: impls run with the model default options (``MODEL_OPTIONS``: compact far positions, position-free scores), which
#: rotate and unrotate with RoPE frequencies (base 1e5, SmolLM2's); the others with ``ms_attention``'s own defaults
MODEL_DEFAULT = {"c16-K64-m16-model", "c16-K64-m16-model-kv", "c16-K64-m4-model"}
#: impls that select once per kv head (``select_per="kv_group"``, the second-best retrieval set-up)
KV_GROUP = {"c16-K64-m16-model-kv"}
ROPE_BASE = 1e5


def _options(impl: str, T: int, D: int) -> dict:
    """Extra ``ms_attention`` arguments of ``impl``: for MODEL_DEFAULT the model options with ``rope_inv_freq [D/2]``
    and ``position_ids [1, T]``; none otherwise."""
    if impl not in MODEL_DEFAULT:
        return {}
    import torch

    from ds_msattn.attention.options import MODEL_OPTIONS

    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    extra = dict(select_per="kv_group") if impl in KV_GROUP else {}
    return dict(MODEL_OPTIONS, **extra, rope_inv_freq=inv_freq, position_ids=torch.arange(T)[None])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flops(T: int, H: int, D: int, params: dict | None, backward: bool) -> float:
    """Matmul FLOPs of attention actually computed: causal dense counts the lower triangle."""
    if params is None:
        pairs = T * (T + 1) / 2
    else:
        c, K, m = params["region_size"], params["top_k"], params["merge"]
        # each query block of m*c rows: its selected history (at most K-m regions) + its own block (rectangle)
        blocks = -(-T // (m * c))
        pairs = 0
        for b in range(blocks):
            rows = min(m * c, T - b * m * c)
            pairs += rows * (min(b * m, K - m) * c + m * c)
    fwd = 4 * pairs * D * H
    return fwd * (3.5 if backward else 1.0)  # backward: 2.5x the forward (dq, dk, dv and the recomputed P)


def worker(impl: str, T: int, hkv: int, mode: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from ds_msattn import ms_attention

    B, H, D = 1, 8, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, hkv, T, D, generator=g)
    v = torch.randn(B, hkv, T, D, generator=g)
    do = torch.randn(B, H, T, D, generator=g)
    backward = mode == "fwd+bwd"
    for x in (q, k, v):
        x.requires_grad_(backward)

    options = _options(impl, T, D)

    def step():
        if impl == "sdpa":
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != H)
        else:
            o = ms_attention(q, k, v, backend="torch", **PARAMS[impl], **options)
        if backward:
            o.backward(do)
            for x in (q, k, v):
                x.grad = None
        return o

    base = _rss_mb()
    with torch.set_grad_enabled(backward):
        if repeats > 1:
            step()  # warm-up (single-run cases, SDPA from 32K, take tens of seconds: no warm-up)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    select = None
    if impl != "sdpa":  # the region selection alone, as the op runs it (same inputs): its share of the op
        from ds_msattn.attention import select_regions
        from ds_msattn.attention.options import make_options

        kw = {k: v for k, v in PARAMS[impl].items()}
        if options:
            from ds_msattn.attention.options import MODEL_OPTIONS

            kw.update(options=make_options(**{n: x for n, x in options.items() if n in MODEL_OPTIONS}),
                      rope_inv_freq=options["rope_inv_freq"], positions=options["position_ids"])
        with torch.no_grad():
            select_regions(q, k, **kw)
            sel_times = []
            for _ in range(max(repeats, 3)):
                start = time.perf_counter()
                select_regions(q, k, **kw)
                sel_times.append(time.perf_counter() - start)
        select = statistics.median(sel_times)
    return {"seconds": statistics.median(times), "select_seconds": select, "peak_mb": peak, "extra_mb": peak - base}


def measure(impl, T, hkv, mode, repeats) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(T), str(hkv), mode, str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for impl in sorted({r["impl"] for r in rows}):
            for hkv in sorted({r["hkv"] for r in rows}):
                pts = [(r["T"], r["seconds"]) for r in rows if r["impl"] == impl and r["mode"] == mode and r["hkv"] == hkv]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{impl} Hkv={hkv}")
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="seconds", title=f"{mode}, fp32, B1 H8 D64, CPU")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def profile(T: int, hkv: int, out: Path, impl: str = "c16-K64-m16") -> None:
    """torch.profiler table (self CPU time per op) of one MS forward+backward of ``impl`` -> ``out``."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ds_msattn import ms_attention

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 64, generator=g, requires_grad=True) for h in (8, hkv, hkv))
    do = torch.randn(1, 8, T, 64, generator=g)
    options = _options(impl, T, 64)

    def run():
        ms_attention(q, k, v, backend="torch", **PARAMS[impl], **options).backward(do)

    run()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    out.write_text(f"# python benchmarks/attention.py {' '.join(sys.argv[1:])}\n"
                   f"MS {impl} forward+backward, T={T}, Hq=8, Hkv={hkv}, D=64, fp32\n\n{table}\n")
    print(out.read_text())


def tiles(out: Path, repeats: int) -> None:
    """The CPU flash kernel on the shapes of one 32K layer's attention parts (Hq 8, Hkv 2, D 64, 128 blocks of 256
    queries, 4 blocks per call): the selected part per query head (256 queries x 768 keys: K - m = 48 regions)
    against per kv head (the 4 heads of a kv group stacked, 1024 x 768; same FLOPs), and the local causal part (256 x 256). -> ``out`` .md and .json."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    g = torch.Generator().manual_seed(0)
    per_call = 4  # blocks per call, about what the torch path's chunks hold here (CHUNK_BUDGET)
    cases = [("selected, per query head", 8, 128, 256, 768, False),
             ("selected, per kv head (G=4 stacked)", 2, 128, 1024, 768, False),
             ("local, causal", 8, 128, 256, 256, True)]
    rows = []
    for name, n, blocks, L, S, causal in cases:
        q = torch.randn(n, per_call, L, 64, generator=g)
        k, v = torch.randn(n, per_call, S, 64, generator=g), torch.randn(n, per_call, S, 64, generator=g)
        o, lse = flash(q, k, v, 0.0, causal, scale=0.125)
        do = torch.randn(o.shape, generator=g)
        fwd, bwd = [], []
        for _ in range(repeats):
            t_fwd = t_bwd = 0.0
            for _ in range(blocks // per_call):  # the same inputs each call: a chunk's tiles stay in cache as in the op
                t0 = time.perf_counter()
                flash(q, k, v, 0.0, causal, scale=0.125)
                t1 = time.perf_counter()
                flash_bwd(do, q, k, v, o, lse, 0.0, causal, scale=0.125)
                t_fwd, t_bwd = t_fwd + t1 - t0, t_bwd + time.perf_counter() - t1
            fwd.append(t_fwd)
            bwd.append(t_bwd)
        useful = 4 * n * blocks * L * S * 64 / (2 if causal else 1)  # QK^T and PV; the causal half only
        f, b = statistics.median(fwd), statistics.median(bwd)
        rows.append(dict(part=name, calls_x_heads=f"{n} x {per_call} x {blocks // per_call} calls", queries=L, keys=S, causal=causal, fwd_s=round(f, 4),
                         bwd_s=round(b, 4), fwd_gflops=round(useful / f / 1e9), bwd_gflops=round(2.5 * useful / b / 1e9)))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# PyTorch's CPU flash kernel on the attention parts of one 32K layer ({torch.get_num_threads()} threads, fp32)", "",
             f"Command: `python benchmarks/attention.py {' '.join(sys.argv[1:])}` (median of {repeats} runs; GFLOP/s of "
             "useful FLOPs: 4*L*S*D per (block, head), half that when causal, backward counted as 2.5x the forward).",
             "", "| part | heads x blocks per call x calls | queries | keys | fwd s | bwd s | fwd GFLOP/s | bwd GFLOP/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['part']} | {r['calls_x_heads']} | {r['queries']} | {r['keys']} | {r['fwd_s']} | {r['bwd_s']} | "
              f"{r['fwd_gflops']} | {r['bwd_gflops']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--hkv", default="8,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat everywhere")
    parser.add_argument("--impls", default=",".join(["sdpa", *PARAMS]),
                        help=f"comma-separated, from sdpa,{','.join(PARAMS)} (-model: the model default options)")
    parser.add_argument("--out", default=str(RESULTS / "attention_cpu"))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=int, default=None, metavar="T",
                        help="instead: torch.profiler table of one MS forward+backward at T tokens (first --hkv; the first MS impl of --impls when given)")
    parser.add_argument("--tiles", action="store_true",
                        help="instead: the CPU flash kernel on one 32K layer's parts, per query head against per kv "
                             "group (benchmarks/results/attention_cpu_tiles.md)")
    args = parser.parse_args()
    if args.tiles:
        tiles(RESULTS / "attention_cpu_tiles", args.repeats)
        return 0
    impls = args.impls.split(",")
    unknown = [i for i in impls if i != "sdpa" and i not in PARAMS]
    if unknown or "sdpa" not in impls:
        parser.error(f"--impls must include sdpa (the baseline of every ratio) and name only sdpa,{','.join(PARAMS)}; "
                     f"got {args.impls!r}")
    if args.worker:
        impl, T, hkv, mode, repeats = args.worker
        print(json.dumps(worker(impl, int(T), int(hkv), mode, int(repeats))))
        return 0
    if args.profile:
        ms = [i for i in impls if i != "sdpa"]
        impl = ms[0] if args.impls != parser.get_default("impls") and ms else "c16-K64-m16"
        name = "attention_cpu_profile" + ("_model" if impl in MODEL_DEFAULT else "") + ".txt"
        profile(args.profile, int(args.hkv.split(",")[0]), RESULTS / name, impl)
        return 0

    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        for hkv in (int(x) for x in args.hkv.split(",")):
            for mode in ("fwd", "fwd+bwd"):
                for impl in impls:
                    repeats = 1 if args.quick or (impl == "sdpa" and T >= 32768) else args.repeats
                    r = measure(impl, T, hkv, mode, repeats)
                    params = PARAMS.get(impl)
                    r.update(impl=impl, T=T, hkv=hkv, mode=mode, flops=flops(T, 8, 64, params, mode == "fwd+bwd"))
                    rows.append(r)
                    print(f"T={T:6d} Hkv={hkv} {mode:8s} {impl:14s} {r['seconds']:8.3f} s  peak {r['peak_mb']:7.0f} MiB"
                          f"  extra {r['extra_mb']:7.0f} MiB", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# MS attention (torch path) vs causal SDPA, CPU",
        "",
        f"fp32, B=1, Hq=8, D=64, {os.environ.get('BENCH_THREADS', '2')} threads; median of runs (1 run, no warm-up, for SDPA from 32K);"
        " `speedup` = SDPA time / MS time measured in the same run; `FLOP ratio` = attention matmul FLOPs of causal"
        " SDPA / of MS; `selection share` = `select_regions` alone (median of at least 3 runs in the same process) /"
        " the whole op; peak = process peak RSS, extra = peak minus RSS after making the inputs.",
        "",
        f"Command: `python benchmarks/attention.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        "",
        "| T | Hkv | pass | impl | seconds | speedup | FLOP ratio | GFLOP/s | selection share | peak MiB | extra MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        dense = next(d for d in rows if d["impl"] == "sdpa" and (d["T"], d["hkv"], d["mode"]) == (r["T"], r["hkv"], r["mode"]))
        speedup = dense["seconds"] / r["seconds"]
        ratio = dense["flops"] / r["flops"]
        share = "" if r["select_seconds"] is None else f"{100 * r['select_seconds'] / r['seconds']:.1f}%"
        lines.append(
            f"| {r['T']} | {r['hkv']} | {r['mode']} | {r['impl']} | {r['seconds']:.3f} | {speedup:.1f}x | {ratio:.1f}x |"
            f" {r['flops'] / r['seconds'] / 1e9:.0f} | {share} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')}, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
