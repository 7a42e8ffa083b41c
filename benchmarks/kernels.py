"""Triton MS attention against SDPA (flash) causal attention on a CUDA GPU: forward and forward+backward.

    python benchmarks/kernels.py [--out benchmarks/results] [--name kernels_h100] [--max-t 65536]
    python benchmarks/kernels.py --from-csv benchmarks/results/kernels_h100.csv   # re-render md/png only

Shapes: B=1, bf16, causal; heads (Hq=32, Hkv=8, D=128) and (Hq=Hkv=8, D=64); T = 4K..64K; MS attention with
c=16 K=64 m=16 and the paper's c=16 K=512 m=128, one sink region. Each time is the median of
``triton.testing.do_bench``. ``ms_kernel_ms`` times the Triton attention given the selection;
``select_ms`` times ``select_regions`` (PyTorch) alone, ``select_kernel_ms`` the Triton selection kernel
(``kernels/select.py``, what ``backend="triton"`` runs; ``select_same`` says whether its ``sel`` equals
``select_regions``'); the end-to-end MS time is kernel + PyTorch selection (``speedup_end_to_end``) and
kernel + selection kernel (``speedup_end_to_end_fused``).

TFLOP/s count matmul FLOPs of the attention as computed (4*D per attended query-key pair forward, 2.5x that
for backward, as FlashAttention counts): dense causal pairs T*(T+1)/2; MS pairs from the actual selection
(selected regions times c plus the causal own block). The backward of the MS kernels recomputes scores in
two kernels, so its real work is higher than the counted FLOPs.

Writes ``<name>.csv``, ``<name>.md`` and ``<name>.png``. On a machine without CUDA it prints why and exits.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["device", "Hq", "Hkv", "D", "T", "c", "K", "m", "mode", "sdpa_ms", "ms_kernel_ms", "select_ms",
          "select_kernel_ms", "select_same", "sdpa_tflops", "ms_tflops", "speedup_kernel", "speedup_end_to_end",
          "speedup_end_to_end_fused", "keys_per_query"]


def _import_kernels():
    """``(select_regions, ms_attention_triton, select_regions_triton)``; without the installed package (or its
    transformers), load ``ds_msattn.attention`` and the top-level ``kernels/`` folder straight from this checkout."""
    try:
        from ds_msattn.attention import select_regions
        from ds_msattn.kernels import ms_attention_triton
        from ds_msattn.kernels.select import select_regions_triton

        return select_regions, ms_attention_triton, select_regions_triton
    except Exception as e:  # noqa: BLE001  (transformers of another version can fail in many ways)
        print(f"note: importing the installed package failed ({e}); loading from {ROOT}", file=sys.stderr)
    for name in [n for n in sys.modules if n == "ds_msattn" or n.startswith("ds_msattn.")]:
        del sys.modules[name]
    pkg = types.ModuleType("ds_msattn")  # a bare parent package: skips ds_msattn/__init__ (transformers)
    pkg.__path__ = [str(ROOT / "ds_msattn")]
    sys.modules["ds_msattn"] = pkg
    spec = importlib.util.spec_from_file_location(
        "ds_msattn.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["ds_msattn.kernels"] = kernels
    spec.loader.exec_module(kernels)
    from ds_msattn.attention.selection import select_regions
    from ds_msattn.kernels.select import select_regions_triton

    return select_regions, kernels.ms_attention_triton, select_regions_triton


def _ms_pairs(T: int, c: int, K: int, m: int) -> int:
    """Query-key pairs MS attention computes (per batch row and head)."""
    mc = c * m
    total = 0
    for b in range(math.ceil(math.ceil(T / c) / m)):
        rows = min(T, (b + 1) * mc) - b * mc
        selected = min(b * m, K - m) * c
        total += rows * selected + rows * (rows + 1) // 2
    return total


def _bench(fn, inputs: list[torch.Tensor], backward: bool, do_bench) -> float:
    if not backward:
        with torch.no_grad():
            return do_bench(fn, return_mode="median")
    grad = torch.randn_like(fn())

    def step():
        fn().backward(grad)

    return do_bench(step, grad_to_none=inputs, return_mode="median")


def run(args) -> list[dict]:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    select_regions, ms_attention_triton, select_regions_triton = _import_kernels()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    heads = [(32, 8, 128), (8, 8, 64)]
    params = [(16, 64, 16), (16, 512, 128)]
    lengths = [t for t in (4096, 8192, 16384, 32768, 65536) if t <= args.max_t]
    rows = []
    for T in lengths:  # lengths outermost: a run cut short still covers every head layout at the shorter T
        for Hq, Hkv, D in heads:
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(1, Hq, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            # SDPA's flash kernel gets kv heads repeated to Hq (same FLOPs as a GQA-aware kernel); forcing the
            # backend makes a silent fallback to the T^2-memory math path an error instead.
            ke, ve = (x.repeat_interleave(Hq // Hkv, dim=1).requires_grad_() for x in (k, v))
            scale = D**-0.5
            sdpa = {}
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    sdpa[mode] = _bench(
                        lambda: torch.nn.functional.scaled_dot_product_attention(
                            qg, ke, ve, is_causal=True, scale=scale
                        ),
                        [qg, ke, ve],
                        backward,
                        triton.testing.do_bench,
                    )
            del ke, ve
            dense_pairs = T * (T + 1) // 2
            for c, K, m in params:
                sel = select_regions(q, k, region_size=c, top_k=K, merge=m, sink_regions=1)
                select_ms = triton.testing.do_bench(
                    lambda: select_regions(q, k, region_size=c, top_k=K, merge=m, sink_regions=1),
                    return_mode="median",
                )
                # The selection kernel (falls back to select_regions where its lists do not fit in registers).
                fused = select_regions_triton(q, k, region_size=c, top_k=K, merge=m, sink_regions=1)
                select_same = bool(torch.equal(fused, sel))
                select_kernel_ms = triton.testing.do_bench(
                    lambda: select_regions_triton(q, k, region_size=c, top_k=K, merge=m, sink_regions=1),
                    return_mode="median",
                )
                del fused
                pairs = _ms_pairs(T, c, K, m)
                for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                    ms = _bench(
                        lambda: ms_attention_triton(qg, kg, vg, sel, region_size=c, merge=m, scale=scale),
                        [qg, kg, vg],
                        backward,
                        triton.testing.do_bench,
                    )
                    factor = 4 * D * Hq * (3.5 if backward else 1.0)
                    row = {
                        "device": name, "Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "c": c, "K": K, "m": m, "mode": mode,
                        "sdpa_ms": round(sdpa[mode], 4), "ms_kernel_ms": round(ms, 4), "select_ms": round(select_ms, 4),
                        "select_kernel_ms": round(select_kernel_ms, 4), "select_same": select_same,
                        "sdpa_tflops": round(factor * dense_pairs / sdpa[mode] / 1e9, 1),
                        "ms_tflops": round(factor * pairs / ms / 1e9, 1),
                        "speedup_kernel": round(sdpa[mode] / ms, 2),
                        "speedup_end_to_end": round(sdpa[mode] / (ms + select_ms), 2),
                        "speedup_end_to_end_fused": round(sdpa[mode] / (ms + select_kernel_ms), 2),
                        "keys_per_query": round(pairs / T, 1),
                    }
                    rows.append(row)
                    print(row, flush=True)
                    _write_csv(rows, args.out / f"{args.name}.csv")
            del q, k, v, qg, kg, vg
            torch.cuda.empty_cache()
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _select_kernel_cell(r: dict) -> str:
    """``ms (same)``; empty for rows measured before the selection kernel existed."""
    return f"{r['select_kernel_ms']} ({r['select_same']})" if r.get("select_kernel_ms") not in (None, "") else ""


def write_markdown(rows: list[dict], path: Path) -> None:
    device = rows[0]["device"] if rows else "?"
    lines = [
        f"# Triton MS attention vs SDPA causal (flash), {device}",
        "",
        "B=1, bf16, causal, one sink region. Median ms of `triton.testing.do_bench`. `MS kernel` = Triton attention",
        "given the selection; `select` = `select_regions` in PyTorch; `select kernel` = the Triton selection kernel",
        "(`same` = its sel equals select_regions'); end-to-end speedup = SDPA / (kernel + select), fused = SDPA /",
        "(kernel + select kernel).",
        "TFLOP/s: 4*D FLOPs per computed query-key pair forward, x3.5 for forward+backward.",
        "",
        "| Hq/Hkv/D | T | c/K/m | mode | SDPA ms | MS kernel ms | select ms | select kernel ms (same) "
        "| SDPA TFLOP/s | MS TFLOP/s | speedup (kernel) | speedup (end-to-end) | speedup (end-to-end, fused) "
        "| keys/query |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['Hq']}/{r['Hkv']}/{r['D']} | {r['T']} | {r['c']}/{r['K']}/{r['m']} | {r['mode']} | {r['sdpa_ms']} "
            f"| {r['ms_kernel_ms']} | {r['select_ms']} | {_select_kernel_cell(r)} "
            f"| {r['sdpa_tflops']} | {r['ms_tflops']} | {r['speedup_kernel']} | {r['speedup_end_to_end']} "
            f"| {r.get('speedup_end_to_end_fused', '')} | {r['keys_per_query']} |"
        )
    notes = path.with_name(path.stem + "_notes.md")  # hand-written run notes (software versions), kept on re-render
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    heads = sorted({(int(r["Hq"]), int(r["Hkv"]), int(r["D"])) for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(heads), 2, figsize=(11, 4 * len(heads)), squeeze=False)
    for i, hd in enumerate(heads):
        for j, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[i][j]
            sub = [r for r in rows if (int(r["Hq"]), int(r["Hkv"]), int(r["D"])) == hd and r["mode"] == mode]
            ts = sorted({int(r["T"]) for r in sub})
            dense = {int(r["T"]): float(r["sdpa_ms"]) for r in sub}
            ax.plot(ts, [dense[t] for t in ts], "k-o", label="SDPA causal (flash)")
            for p in sorted({(int(r["c"]), int(r["K"]), int(r["m"])) for r in sub}):
                pts = {int(r["T"]): float(r["ms_kernel_ms"]) for r in sub
                       if (int(r["c"]), int(r["K"]), int(r["m"])) == p}
                ts_p = sorted(pts)
                ax.plot(ts_p, [pts[t] for t in ts_p], "-o", label=f"MS Triton kernel c={p[0]} K={p[1]} m={p[2]}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (tokens)")
            ax.set_ylabel("median ms")
            ax.set_title(f"Hq={hd[0]} Hkv={hd[1]} D={hd[2]}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"MS attention Triton kernels (selection excluded) vs SDPA, bf16, B=1 - {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="kernels_h100")
    parser.add_argument("--max-t", type=int, default=65536)
    parser.add_argument("--from-csv", type=Path, default=None, help="only re-render the Markdown and PNG of a CSV")
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        rows = _read_csv(args.from_csv)
        base = args.from_csv.with_suffix("")
    else:
        if not torch.cuda.is_available():
            print("benchmarks/kernels.py needs a CUDA GPU (Triton kernels vs SDPA flash): none found, nothing measured",
                  file=sys.stderr)
            return 1
        rows = run(args)
        base = args.out / args.name
    write_markdown(rows, base.with_suffix(".md"))
    write_plot(rows, base.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
