"""Sequence-parallel scaling: region sharding vs DeepSpeed-Ulysses vs an all-gather-KV baseline.

Part 1, measured on this CPU (gloo, real processes, one thread each): one MS attention layer forward +
backward with SP = 1, 2, 4, at fixed total tokens and at fixed tokens per rank. Per rank: step time (median
of ``--repeats`` after a warm-up), peak RSS of the rank's process, and bytes sent by region sharding
(counted by the exchange) and by Ulysses (its all-to-alls); the all-gather-KV baseline is analytic.

Part 2, the byte model, checked against Part 1's counts and extrapolated to 128K..4M tokens on 8..64 ranks
with the paper's parameters (c=16, K=512, m=128), bf16, for Llama2-7B (32 heads, 32 kv heads, D=128) and
a GQA model (32 heads, 8 kv heads, D=128), the latter with ``select_per`` head and kv_group. Per rank,
forward + backward:

- region sharding, as ``ds_msattn/parallel/region_shard.py`` sends it: ``2 * Hkv * U * c * 2D * bytes`` (k, v
  in; dk, dv back) + the kbar all-gather ``(P-1) * Hkv * (Tl/c) * D * 4`` + request counts and ids (int64).
  U (distinct remote regions per kv head: the exchange asks once per (kv head, region), the union over the
  query heads reading that kv head) is at most ``min(s' + S * NBl * (K-m-s'), remote history regions)``, S = G
  selections per kv head with ``select_per="head"``, 1 with ``"kv_group"`` (no two selections overlap; exact
  when every history fits). *fetch*: the last rank's requests (the most history); *busiest*: the maximum over
  ranks of fetched + served regions (rank r serves each later rank at most all of its own Tl/c regions);
- Ulysses: all-to-all of q, k, v, o forward and of their gradients backward: ``2 * (2Hq + 2Hkv) * Tl * D *
  bytes * (P-1)/P``;
- all-gather KV: every rank receives all other k, v (forward) and reduce-scatters dk, dv (backward):
  ``2 * (P-1) * Tl * Hkv * 2D * bytes``.

    python benchmarks/sp_scaling.py            # writes benchmarks/results/sp_scaling.{csv,md,png}
    python benchmarks/sp_scaling.py --quick
    python benchmarks/sp_scaling.py --model-only   # Part 2 alone (arithmetic); Part 1's table from its last CSV
"""

from __future__ import annotations

import argparse
import csv
import math
import resource
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# measured configuration (CPU, small): GQA so that Ulysses works up to P=4
SHAPE = dict(B=1, Hq=8, Hkv=4, D=64)
PARAMS = dict(region_size=16, top_k=16, merge=4, sink_regions=1)


def _measure(rank, world, mode, T, repeats):
    import torch
    import torch.distributed as dist

    from ds_msattn.attention import ms_attention
    from ds_msattn.parallel.region_shard import TrafficStats, region_sharded_attention
    from ds_msattn.parallel.ulysses import UlyssesMSAttention

    B, Hq, Hkv, D = SHAPE["B"], SHAPE["Hq"], SHAPE["Hkv"], SHAPE["D"]
    c, m = PARAMS["region_size"], PARAMS["merge"]
    Tl = math.ceil(T / (world * m * c)) * m * c
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, world * Tl, D, generator=g)[:, :, rank * Tl : (rank + 1) * Tl].contiguous()
    k = torch.randn(B, Hkv, world * Tl, D, generator=g)[:, :, rank * Tl : (rank + 1) * Tl].contiguous()
    v = torch.randn(B, Hkv, world * Tl, D, generator=g)[:, :, rank * Tl : (rank + 1) * Tl].contiguous()
    do = torch.randn(B, Hq, Tl, D)
    stats = TrafficStats()
    uly = UlyssesMSAttention(dist.group.WORLD) if mode == "ulysses" and world > 1 else None
    times = []
    for i in range(repeats + 1):
        stats.clear()
        qi, ki, vi = (x.clone().requires_grad_() for x in (q, k, v))
        dist.barrier()
        t0 = time.perf_counter()
        if world == 1:
            o = ms_attention(qi, ki, vi, **PARAMS)
        elif mode == "region":
            o = region_sharded_attention(qi, ki, vi, **PARAMS, valid_len=T, stats=stats)
        else:
            o = uly(qi, ki, vi, dict(PARAMS, scale=None), T)
        o.backward(do)
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    row = {"time_s": statistics.median(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if mode == "region" and world > 1:
        tot = stats.totals()
        row.update(sent=tot["kv_sent"] + tot["grad_sent"] + tot["meta_sent"], recv=tot["kv_recv"] + tot["grad_recv"],
                   kbar=tot["kbar"], regions=tot["regions_fetched"])
    elif mode == "ulysses" and world > 1:
        row.update(sent=2 * uly.bytes_sent[-1])  # forward all-to-alls + the same again in backward
    return row


# ------------------------------------------------------------------ byte model


def fetch_regions_bound(T, P, *, Hq, Hkv, c, K, m, s=1, select_per="head", rank=None) -> int:
    """Distinct remote regions one kv head of ``rank`` (default the last, the most history) fetches, at most.

    What ``ExchangePlan`` requests: the union, over the rank's NBl query blocks and over the query heads that
    read the kv head, of the regions they selected on other ranks, one request per (kv head, region) whichever
    head asked. A block selects its whole history while that fits (``b*m <= K-m``), else the sinks (on rank 0)
    plus n = K-m-s' regions per selection: G selections per kv head with ``select_per="head"`` (one per query
    head), one with ``"kv_group"`` (shared by the group). Bound: no two selections overlap, capped by the
    remote history.
    """
    Tl = math.ceil(T / (P * m * c)) * m * c
    Rl, NBl = Tl // c, Tl // (m * c)
    if select_per not in ("head", "kv_group"):
        raise ValueError(f"select_per must be 'head' or 'kv_group', got {select_per!r}")
    selections = Hq // Hkv if select_per == "head" else 1
    r = P - 1 if rank is None else rank
    budget = K - m
    remote = r * Rl  # history of the rank's blocks that lies on other ranks: regions [0, r*Rl)
    first_block = r * NBl
    if first_block * m <= budget or remote <= budget:  # dense: the whole history is selected
        return remote
    sinks = min(s, budget)
    return min(remote, sinks + selections * NBl * (budget - sinks))


def region_bytes(T, P, *, Hq, Hkv, D, c, K, m, s=1, elem=2, rank=None, select_per="head"):
    """Bytes ``rank`` (default the last) moves as a requester, per layer, forward + backward, and its regions fetched.

    Counted as ``region_shard`` sends them (B=1): k and v of each fetched region in (``c * 2D * elem``, the
    ``[k ; v]`` rows of RegionExchange) and dk, dv back out (same size, the kv dtype), the kbar all-gather
    received (``(P-1) * Hkv * Rl * D`` fp32), request counts (int64 per other rank) and request ids (int64 per
    fetched (kv head, region)). Returns ``(bytes, fetched (kv head, region) pairs)``.
    """
    Tl = math.ceil(T / (P * m * c)) * m * c
    Rl = Tl // c
    U = fetch_regions_bound(T, P, Hq=Hq, Hkv=Hkv, c=c, K=K, m=m, s=s, select_per=select_per, rank=rank)
    data = 2 * Hkv * U * c * 2 * D * elem  # k, v in forward + dk, dv in backward
    kbar = (P - 1) * Hkv * Rl * D * 4
    meta = 8 * (P - 1) + 8 * Hkv * U
    return data + kbar + meta, Hkv * U


def region_busiest_bytes(T, P, *, Hq, Hkv, D, c, K, m, s=1, elem=2, select_per="head"):
    """Bytes of the busiest rank counting both sides of the exchange: what it fetches and what it serves.

    Rank r serves each later rank q at most ``min(Rl, fetch bound of q)`` regions per kv head (k, v out in
    forward, dk, dv in in backward, the request ids in); early ranks serve much (rank 0 holds the sinks and is
    in every history), late ranks fetch much. Returns ``(bytes, rank)`` of the maximum over ranks.
    """
    Tl = math.ceil(T / (P * m * c)) * m * c
    Rl = Tl // c
    kw = dict(Hq=Hq, Hkv=Hkv, c=c, K=K, m=m, s=s, select_per=select_per)
    fetch = [fetch_regions_bound(T, P, rank=r, **kw) for r in range(P)]
    best = (-1, 0)
    for r in range(P):
        served = sum(min(Rl, fetch[q]) for q in range(r + 1, P))
        moved = fetch[r] + served  # per kv head
        total = 2 * Hkv * moved * c * 2 * D * elem + (P - 1) * Hkv * Rl * D * 4 + 8 * (P - 1) + 8 * Hkv * moved
        best = max(best, (total, r))
    return best


def ulysses_bytes(T, P, *, Hq, Hkv, D, elem=2):
    Tl = T / P
    return 2 * (2 * Hq + 2 * Hkv) * Tl * D * elem * (P - 1) / P


def allgather_kv_bytes(T, P, *, Hkv, D, elem=2):
    Tl = T / P
    return 2 * (P - 1) * Tl * Hkv * 2 * D * elem


# ------------------------------------------------------------------ main


MODELS = {"llama2-7b (32/32 heads)": dict(Hq=32, Hkv=32, D=128), "gqa (32/8 heads)": dict(Hq=32, Hkv=8, D=128)}
PAPER = dict(c=16, K=512, m=128, s=1)
MODEL_P = (8, 16, 32, 64)
MODEL_T = (128 * 1024, 512 * 1024, 1024 * 1024, 4 * 1024 * 1024)


def byte_model() -> list[dict]:
    """The byte model with the paper's parameters, bf16, per rank and layer, fwd+bwd: one row per (model, select_per, P, T).

    ``select_per="kv_group"`` only for the GQA model: with one query head per kv head (Llama2-7B) it is the same
    selection as ``head``.
    """
    ext = []
    for name, mdl in MODELS.items():
        modes = ("head", "kv_group") if mdl["Hq"] > mdl["Hkv"] else ("head",)
        for select_per in modes:
            for P in MODEL_P:
                for T in MODEL_T:
                    reg, pairs = region_bytes(T, P, **mdl, **PAPER, select_per=select_per)
                    busiest, busiest_rank = region_busiest_bytes(T, P, **mdl, **PAPER, select_per=select_per)
                    ext.append({
                        "model": name, "select_per": select_per, "P": P, "T": T,
                        "region_fetched_pairs_last_rank": pairs,
                        "region_bound_GiB": reg / 2**30,
                        "region_busiest_bound_GiB": busiest / 2**30,
                        "region_busiest_rank": busiest_rank,
                        "ulysses_GiB": ulysses_bytes(T, P, **mdl) / 2**30,
                        "allgather_kv_GiB": allgather_kv_bytes(T, P, Hkv=mdl["Hkv"], D=mdl["D"]) / 2**30,
                    })
    return ext


def measure(args) -> tuple[list[dict], int, int]:
    """Part 1: real gloo processes on this CPU; writes sp_scaling_measured.csv."""
    from ds_msattn.parallel.spawn import run_ranks

    total = 1024 if args.quick else 4096
    per_rank = 512 if args.quick else 1024
    repeats = 1 if args.quick else args.repeats
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = []
    for P in (1, 2, 4):
        for setting, T in (("fixed-total", total), ("fixed-per-rank", per_rank * P)):
            modes = ("single",) if P == 1 else ("region", "ulysses")
            for mode in modes:
                if any(r["P"] == P and r["T"] == T and r["mode"] == mode for r in runs):
                    prev = next(r for r in runs if r["P"] == P and r["T"] == T and r["mode"] == mode)
                    runs.append(dict(prev, setting=setting))
                    continue
                rows = run_ranks(_measure, P, mode, T, repeats, timeout=900)
                hq, hkv, d = SHAPE["Hq"], SHAPE["Hkv"], SHAPE["D"]
                model_region, model_u = region_bytes(T, P, Hq=hq, Hkv=hkv, D=d, elem=4, K=PARAMS["top_k"],
                                                     m=PARAMS["merge"], c=PARAMS["region_size"]) if P > 1 else (0, 0)
                rec = {
                    "setting": setting, "P": P, "T": T, "mode": mode,
                    "time_s_max_rank": max(r["time_s"] for r in rows),
                    "peak_rss_mib_max_rank": max(r["peak_rss_mib"] for r in rows),
                    "bytes_sent_max_rank": max(r.get("sent", 0) for r in rows),
                    "region_regions_fetched_max_rank": max(r.get("regions", 0) for r in rows),
                    "region_model_bound_regions": model_u if mode == "region" else "",
                    "ulysses_model_bytes": ulysses_bytes(T, P, Hq=hq, Hkv=hkv, D=d, elem=4) if P > 1 else 0,
                    "allgather_kv_model_bytes": allgather_kv_bytes(T, P, Hkv=hkv, D=d, elem=4),
                }
                if mode == "region":
                    assert rec["region_regions_fetched_max_rank"] <= model_u, (rec, model_u)
                if mode == "ulysses":
                    assert rec["bytes_sent_max_rank"] == rec["ulysses_model_bytes"], rec
                print(rec, flush=True)
                runs.append(rec)
    with open(RESULTS / "sp_scaling_measured.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    return runs, total, per_rank


def _read_measured() -> tuple[list[dict], int, int]:
    """The last measured run (sp_scaling_measured.csv), for ``--model-only``."""
    path = RESULTS / "sp_scaling_measured.csv"
    if not path.exists():
        return [], 0, 0
    with open(path) as f:
        runs = list(csv.DictReader(f))
    num = ("P", "T", "bytes_sent_max_rank", "region_regions_fetched_max_rank")
    for r in runs:
        for key in num:
            r[key] = int(float(r[key])) if r[key] not in ("", None) else 0
        for key in ("time_s_max_rank", "peak_rss_mib_max_rank", "ulysses_model_bytes", "allgather_kv_model_bytes"):
            r[key] = float(r[key])
    total = max((r["T"] for r in runs if r["setting"] == "fixed-total"), default=0)
    per_rank = min((r["T"] for r in runs if r["setting"] == "fixed-per-rank"), default=0)
    return runs, total, per_rank


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=1024 total / 512 per rank, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-only", action="store_true",
                    help="only the byte model (arithmetic, a second); the measured table is read from "
                         "sp_scaling_measured.csv of the last measured run")
    args = ap.parse_args(argv)
    runs, total, per_rank = _read_measured() if args.model_only else measure(args)
    ext = byte_model()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "sp_scaling_model.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ext[0]))
        w.writeheader()
        w.writerows(ext)
    _write_markdown(runs, ext, total, per_rank)
    _plot(ext)
    return 0


def _write_markdown(runs, ext, total, per_rank):
    lines = [
        "# Sequence-parallel scaling (benchmarks/sp_scaling.py)",
        "",
        f"Measured on this machine's CPU (2 cores; every rank one thread, so P=4 oversubscribes), gloo, one MS "
        f"attention layer forward+backward, fp32, B={SHAPE['B']} Hq={SHAPE['Hq']} Hkv={SHAPE['Hkv']} D={SHAPE['D']}, "
        f"c={PARAMS['region_size']} K={PARAMS['top_k']} m={PARAMS['merge']} sink 1. Fixed total T={total}; fixed "
        f"per rank {per_rank} tokens. Bytes: sent per rank, forward+backward (region: counted by the exchange, "
        "incl. request ids, not the kbar all-gather; Ulysses: its all-to-alls; all-gather KV: model).",
        "",
        "| setting | P | T | mode | time (s, slowest rank) | peak RSS MiB | bytes sent/rank | region: regions fetched (bound) | Ulysses model bytes | all-gather-KV model bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        bound = f"{r['region_regions_fetched_max_rank']} ({r['region_model_bound_regions']})" if r["mode"] == "region" else ""
        lines.append(f"| {r['setting']} | {r['P']} | {r['T']} | {r['mode']} | {r['time_s_max_rank']:.3f} | "
                     f"{r['peak_rss_mib_max_rank']:.0f} | {r['bytes_sent_max_rank']} | {bound} | "
                     f"{r['ulysses_model_bytes']:.0f} | {r['allgather_kv_model_bytes']:.0f} |")
    lines += [
        "",
        "## Byte model extrapolated (paper parameters c=16, K=512, m=128, sink 1; bf16; per rank, fwd+bwd, GiB)",
        "",
        "Counted as `ds_msattn/parallel/region_shard.py` sends them: k and v of every fetched region in, dk and dv",
        "back out, the kbar all-gather (fp32), request counts and ids (int64). Its `ExchangePlan` asks once per",
        "(kv head, region), the union over the query heads that read that kv head, so the exchange is already",
        "kv-group aware: with `select_per=\"kv_group\"` the group's G query heads share one selection and one",
        "fetch; with `head` the G selections are fetched as their union. Both columns of region sharding are",
        "no-overlap bounds (no two selections of one kv head coincide), capped by the history: *fetch* = the last",
        "rank's requests (the most history); *busiest* = max over ranks of fetched + served (rank r serves each later",
        "rank at most all of its own regions), which is rank 0 or 1 when early ranks are in every history.",
        "Llama2-7B has one query head per kv head, so kv_group is its head selection (not repeated).",
        "",
        "| model | select_per | P | T | region fetch (bound) | region busiest rank (bound) | Ulysses | all-gather KV |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in ext:
        lines.append(f"| {e['model']} | {e['select_per']} | {e['P']} | {e['T'] // 1024}K | {e['region_bound_GiB']:.3f} | "
                     f"{e['region_busiest_bound_GiB']:.3f} (rank {e['region_busiest_rank']}) | {e['ulysses_GiB']:.3f} | "
                     f"{e['allgather_kv_GiB']:.3f} |")
    gqa = {(e["P"], e["T"], e["select_per"]): e for e in ext if e["model"].startswith("gqa")}
    lines += [
        "",
        "### GQA (Hq=32, Hkv=8, D=128): kv_group against head",
        "",
        "| P | T | fetch head | fetch kv_group | kv_group / head | busiest head | busiest kv_group | Ulysses "
        "| all-gather KV |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (P, T, sp), h in sorted(gqa.items()):
        if sp != "head" or (P, T, "kv_group") not in gqa:
            continue
        g = gqa[(P, T, "kv_group")]
        lines.append(f"| {P} | {T // 1024}K | {h['region_bound_GiB']:.3f} | {g['region_bound_GiB']:.3f} | "
                     f"{g['region_bound_GiB'] / h['region_bound_GiB']:.2f} | {h['region_busiest_bound_GiB']:.3f} | "
                     f"{g['region_busiest_bound_GiB']:.3f} | {h['ulysses_GiB']:.3f} | {h['allgather_kv_GiB']:.3f} |")
    (RESULTS / "sp_scaling.md").write_text("\n".join(lines) + "\n")


def _plot(ext):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(e["model"], e["select_per"]) for e in ext})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (name, select_per) in zip(axes[0], panels):
        for P, style in ((8, "-"), (64, "--")):
            rows = [e for e in ext if e["model"] == name and e["select_per"] == select_per and e["P"] == P]
            xs = [e["T"] / 1024 for e in rows]
            for key, color in (("region_bound_GiB", "C0"), ("region_busiest_bound_GiB", "C3"), ("ulysses_GiB", "C1"),
                               ("allgather_kv_GiB", "C2")):
                ax.plot(xs, [e[key] for e in rows], style, color=color, marker="o",
                        label=f"{key.replace('_GiB', '')} P={P}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (K)")
        ax.set_title(f"{name}, select_per={select_per}")
    axes[0][0].set_ylabel("GiB per rank per layer (fwd+bwd)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "sp_scaling.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
