"""Peak memory, disk and time of streaming inference against input length, on a tiny random Llama.

One process streams 256K tokens (random ids from a seeded generator, one chunk at a time, so the input
itself is never held) through ``RecursiveRunner`` with the region store on disk (no host-memory budget) and
records peak RSS (``ru_maxrss``), the store's size on disk and the time when it has read 16K, 32K, 64K, 128K
and 256K tokens. A second process keeps the store in host memory up to 64K, for contrast.
Writes ``benchmarks/results/eval_recursive_memory.{csv,md,png}``.

    python benchmarks/eval_recursive_memory.py [--max-tokens 262144]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CHECKPOINTS = [16384, 32768, 65536, 131072, 262144]
MS = dict(region_size=16, top_k=16, merge=4, sink_regions=1)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(max_tokens: int, memory_mib: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT.parent))
    from ds_msattn.eval.recursive import RecursiveConfig, RecursiveRunner
    from ds_msattn.models import tiny_llama_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tiny_llama_config(max_position_embeddings=max_tokens + 64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    rc = RecursiveConfig(**MS, chunk=1024, window_regions=64, scales=(1, 16, 256), beam=32, far_positions="compact",
                         score="position_free", store_memory_gib=memory_mib / 1024)
    runner = RecursiveRunner(model, rc)
    gen = torch.Generator().manual_seed(1)
    chunks = (torch.randint(0, cfg.vocab_size, (rc.chunk,), generator=gen) for _ in range(max_tokens // rc.chunk))
    rows, t0 = [], time.perf_counter()
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4

    def on_chunk(done: int) -> None:
        if done in CHECKPOINTS:
            rows.append(dict(tokens=done, store_memory_mib=memory_mib, peak_rss_mib=round(_rss_mib(), 1),
                             store_disk_mib=round(runner.store.disk_bytes / 2**20, 1),
                             store_ram_mib=round(runner.store.ram_bytes / 2**20, 1),
                             full_kv_cache_mib=round(done * kv_bytes_per_token / 2**20, 3),
                             seconds=round(time.perf_counter() - t0, 1)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    res = runner.run(chunks, new_tokens=4, log=None, on_chunk=on_chunk)
    rows.append(dict(tokens="+4 generated", store_memory_mib=memory_mib, peak_rss_mib=round(_rss_mib(), 1),
                     store_disk_mib=round(res["store_bytes"]["disk"] / 2**20, 1),
                     store_ram_mib=round(res["store_bytes"]["ram"] / 2**20, 1), full_kv_cache_mib=None,
                     seconds=round(time.perf_counter() - t0, 1)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=262144)
    ap.add_argument("--contrast-tokens", type=int, default=65536)
    ap.add_argument("--worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0
    runs = [(a.max_tokens, 0), (a.contrast_tokens, 10**6)]
    rows = []
    for tokens, window in runs:
        out = subprocess.run([sys.executable, __file__, "--worker", str(tokens), str(window)], check=True,
                             capture_output=True, text=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    (RESULTS / "eval_recursive_memory.csv").write_text(
        "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    lines = ["# Streaming mode: peak memory, store size and time vs input length (tiny random Llama)", "",
             f"2 layers, hidden 64, 4/2 heads, head dim 16, fp32, 1 torch thread, {platform.processor() or platform.machine()}; "
             f"MS c={MS['region_size']} K={MS['top_k']} m={MS['merge']} sinks {MS['sink_regions']}; chunk 1024; window 64 "
             "regions, summary scales 1, 16, 256 regions, beam 32, far_positions compact, score position_free; store fp32. "
             "Input streamed (random ids).",
             "Peak RSS is the process maximum so far (`ru_maxrss`), read when the run reached each length; store sizes "
             "are allocated segments (64 MiB each per array).", "",
             "| store | tokens read | peak RSS MiB | store on disk MiB | store in memory MiB | the KV it holds MiB | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        w = "on disk (no memory budget)" if r["store_memory_mib"] == 0 else "in host memory"
        lines.append(f"| {w} | {r['tokens']} | {r['peak_rss_mib']} | {r['store_disk_mib']} | {r['store_ram_mib']} | "
                     f"{r['full_kv_cache_mib']} | {r['seconds']} |")
    lines += ["", "Command: `python benchmarks/eval_recursive_memory.py` (from the repository root).", ""]
    (RESULTS / "eval_recursive_memory.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for memory, label in ((0, "store on disk"), (10**6, "store in host memory")):
        rs = [r for r in rows if r["store_memory_mib"] == memory and isinstance(r["tokens"], int)]
        ax.plot([r["tokens"] for r in rs], [r["peak_rss_mib"] for r in rs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens read")
    ax.set_ylabel("peak RSS (MiB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "eval_recursive_memory.png", dpi=100)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
