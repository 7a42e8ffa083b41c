"""fp32 against bf16 on this CPU: SmolLM2-135M's matmul shapes and causal SDPA, side by side in one process.

Answers whether ``--dtype bfloat16`` is worth it on a given host (CPUs with AMX or AVX512-BF16 run bf16 matmuls
through oneDNN's fast kernels; others may be slower in bf16). Writes ``benchmarks/results/cpu_dtype.{md,json}``.

    python benchmarks/cpu_dtype.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
#: (name, tokens, in, out): SmolLM2-135M's projections for a 1024-token chunk
LINEARS = [("q/o proj 576x576", 1024, 576, 576), ("k/v proj 576x192", 1024, 576, 192),
           ("mlp up 576x1536", 1024, 576, 1536), ("mlp down 1536x576", 1024, 1536, 576)]
SDPA = [("causal sdpa 9 heads x 4096, D64", 9, 4096, 64)]


def _time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after ``reps // 4 + 2`` warm-up calls (oneDNN builds a kernel per shape)."""
    for _ in range(reps // 4 + 2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _flags() -> list[str]:
    try:
        words = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({w for w in words if w.startswith(("amx", "avx512_bf16"))})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name, n, k, m in LINEARS:
        rec = {"op": name, "gflop": 2 * n * k * m / 1e9}
        for dt in (torch.float32, torch.bfloat16):
            x, w = torch.randn(n, k, dtype=dt), torch.randn(m, k, dtype=dt)
            rec[str(dt).split(".")[1]] = _time(lambda: F.linear(x, w), a.reps)
        rows.append(rec)
    for name, h, t, d in SDPA:
        rec = {"op": name, "gflop": 4 * h * t * t * d / 2 / 1e9}
        for dt in (torch.float32, torch.bfloat16):
            q, k = torch.randn(1, h, t, d, dtype=dt), torch.randn(1, h, t, d, dtype=dt)
            rec[str(dt).split(".")[1]] = _time(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True),
                                               max(2, a.reps // 5))
        rows.append(rec)
    head = (f"# fp32 against bf16 on this CPU ({platform.processor() or platform.machine()}, {a.threads} threads, "
            f"torch {torch.__version__}; flags {', '.join(_flags()) or 'none of amx/avx512_bf16'})")
    lines = [head, "", "Command: `python benchmarks/cpu_dtype.py --threads %d` (one process, one op after the other, "
             "median of %d runs after warm-up; SDPA a fifth as many)." % (a.threads, a.reps), "",
             "| op | fp32 ms | bf16 ms | fp32 GFLOP/s | bf16 GFLOP/s | bf16 speedup |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        f32, b16 = r["float32"], r["bfloat16"]
        lines.append(f"| {r['op']} | {f32 * 1e3:.2f} | {b16 * 1e3:.2f} | {r['gflop'] / f32:.0f} | {r['gflop'] / b16:.0f} | "
                     f"{f32 / b16:.1f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_dtype.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "cpu_dtype.json").write_text(json.dumps({"threads": a.threads, "flags": _flags(), "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
