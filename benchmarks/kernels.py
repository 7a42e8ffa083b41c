"""Triton MS attention against SDPA (flash) causal attention on a CUDA GPU: forward and forward+backward.

    python benchmarks/kernels.py [--out benchmarks/results] [--name kernels_h100] [--lengths 4096,...,65536]
    python benchmarks/kernels.py --mode select --lengths 16384,32768,65536,131072   # selection alone
    python benchmarks/kernels.py --from-csv benchmarks/results/kernels_h100.csv   # re-render md/png only

Shapes: B=1, bf16, causal; heads (Hq=32, Hkv=8, D=128) and (Hq=Hkv=8, D=64) (``--heads``); T = 4K..64K by
default (``--lengths``, 128K fits an 80 GB GPU); MS attention with c=16 K=64 m=16 and the paper's c=16 K=512
m=128 (``--params``), one sink region. Each time is the median of ``triton.testing.do_bench``.

``--mode all`` (default), one row per (T, heads, c/K/m, fwd | fwd+bwd): ``ms_kernel_ms`` times the Triton
attention given the selection; ``select_ms`` times ``select_regions`` (PyTorch) alone, ``select_kernel_ms`` the
Triton selection kernel (``kernels/select.py``, what ``backend="triton"`` runs; ``select_fused`` says whether
these sizes fit the kernel, else it falls back to the PyTorch selection; ``select_same`` whether its ``sel``
equals ``select_regions``'), ``select_speedup`` = select_ms / select_kernel_ms. The end-to-end MS time is
summed from parts, kernel + PyTorch selection (``speedup_end_to_end``) and kernel + selection kernel
(``speedup_end_to_end_fused``), and measured as one call: ``op_ms`` times ``ms_attention(..., backend="triton")``
(selection kernel + attention, and its backward), ``speedup_op`` = sdpa_ms / op_ms, ``select_share_op`` =
select_kernel_ms / op_ms.

``--mode select``: the selection alone, ``select_regions`` (PyTorch) vs the selection kernel, for
``select_per`` head and kv_group; writes ``<name>_select.{csv,md}``.

TFLOP/s count matmul FLOPs of the attention as computed (4*D per attended query-key pair forward, 2.5x that
for backward, as FlashAttention counts): dense causal pairs T*(T+1)/2; MS pairs from the actual selection
(selected regions times c plus the causal own block). The backward of the MS kernels recomputes scores in
two kernels, so its real work is higher than the counted FLOPs.

Writes ``<name>.csv``, ``<name>.md`` and ``<name>.png``. On a machine without CUDA it prints why and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import sys
import time
import types
from pathlib import Path

# torch is imported inside the functions that time things, so that --help and --from-csv need no torch.

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["device", "Hq", "Hkv", "D", "T", "c", "K", "m", "mode", "sdpa_ms", "ms_kernel_ms", "select_ms",
          "select_kernel_ms", "select_fused", "select_same", "select_speedup", "op_ms", "sdpa_tflops", "ms_tflops",
          "speedup_kernel", "speedup_end_to_end", "speedup_end_to_end_fused", "speedup_op", "select_share_op",
          "keys_per_query"]
SELECT_FIELDS = ["device", "Hq", "Hkv", "D", "T", "c", "K", "m", "select_per", "select_ms", "select_kernel_ms",
                 "select_fused", "select_same", "select_speedup"]
DEFAULT_LENGTHS = "4096,8192,16384,32768,65536"


def _import_kernels() -> types.SimpleNamespace:
    """``select_regions``, ``ms_attention``, ``ms_attention_triton``, ``select_regions_triton``, ``fits_kernel``,
    ``MSOptions``; without the installed package (or its transformers), load ``ds_msattn.attention`` and the
    top-level ``kernels/`` folder straight from this checkout."""
    try:
        from ds_msattn.attention import ms_attention, select_regions
        from ds_msattn.attention.options import MSOptions
        from ds_msattn.kernels import ms_attention_triton
        from ds_msattn.kernels.select import fits_kernel, select_regions_triton

        return types.SimpleNamespace(select_regions=select_regions, ms_attention=ms_attention,
                                     ms_attention_triton=ms_attention_triton, select_regions_triton=select_regions_triton,
                                     fits_kernel=fits_kernel, MSOptions=MSOptions)
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
    from ds_msattn.attention import ms_attention, select_regions
    from ds_msattn.attention.options import MSOptions
    from ds_msattn.kernels.select import fits_kernel, select_regions_triton

    return types.SimpleNamespace(select_regions=select_regions, ms_attention=ms_attention,
                                 ms_attention_triton=kernels.ms_attention_triton,
                                 select_regions_triton=select_regions_triton, fits_kernel=fits_kernel,
                                 MSOptions=MSOptions)


def _ms_pairs(T: int, c: int, K: int, m: int) -> int:
    """Query-key pairs MS attention computes (per batch row and head)."""
    mc = c * m
    total = 0
    for b in range(math.ceil(math.ceil(T / c) / m)):
        rows = min(T, (b + 1) * mc) - b * mc
        selected = min(b * m, K - m) * c
        total += rows * selected + rows * (rows + 1) // 2
    return total


def _bench(fn, inputs: list, backward: bool, do_bench) -> float:
    import torch

    if not backward:
        with torch.no_grad():
            return do_bench(fn, return_mode="median")
    grad = torch.randn_like(fn())

    def step():
        fn().backward(grad)

    return do_bench(step, grad_to_none=inputs, return_mode="median")


def _triples(text: str) -> list[tuple[int, int, int]]:
    """``"32/8/128,8/8/64"`` -> ``[(32, 8, 128), (8, 8, 64)]``."""
    out = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected a/b/c triples of positive integers, got {item!r}")
        out.append(tuple(int(p) for p in parts))
    return out


def _lengths(args) -> list[int]:
    lengths = [int(t) for t in args.lengths.split(",")]
    return [t for t in lengths if args.max_t is None or t <= args.max_t]


def _inputs(T: int, Hq: int, Hkv: int, D: int, dry_run: bool = False):
    import torch

    dev = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16  # the interpreter's numpy has no bf16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, Hq, T, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype, generator=g)
    return q, k, v


def _once(fn, return_mode="median", **_):
    """``do_bench`` stand-in for ``--dry-run``: one timed call (ms)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _setup(args):
    """``(do_bench, device name, sdpa backend context)`` for a real run or a CPU ``--dry-run``."""
    import contextlib

    import torch

    if args.dry_run:
        return _once, "cpu (dry run, Triton interpreter)", contextlib.nullcontext
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return triton.testing.do_bench, torch.cuda.get_device_name(torch.device("cuda")), (
        lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))


def _time_selection(kern, q, k, c: int, K: int, m: int, options, do_bench) -> dict:
    """PyTorch ``select_regions`` vs the selection kernel on the same inputs (one ``options``)."""
    import torch

    params = dict(region_size=c, top_k=K, merge=m, sink_regions=1, options=options)
    sel = kern.select_regions(q, k, **params)
    fused = kern.select_regions_triton(q, k, **params)
    same = bool(torch.equal(fused, sel))
    del fused
    select_ms = do_bench(lambda: kern.select_regions(q, k, **params), return_mode="median")
    # The selection kernel (falls back to select_regions where its lists do not fit in registers).
    select_kernel_ms = do_bench(lambda: kern.select_regions_triton(q, k, **params), return_mode="median")
    budget = K - m
    n = budget - min(1, budget)
    return {"sel": sel, "select_ms": round(select_ms, 4), "select_kernel_ms": round(select_kernel_ms, 4),
            "select_fused": bool(n > 0 and kern.fits_kernel(m, n)), "select_same": same,
            "select_speedup": round(select_ms / select_kernel_ms, 2)}


def run(args) -> list[dict]:
    import torch

    do_bench, name, flash = _setup(args)
    kern = _import_kernels()
    rows = []
    for T in _lengths(args):  # lengths outermost: a run cut short still covers every head layout at the shorter T
        for Hq, Hkv, D in args.heads:
            q, k, v = _inputs(T, Hq, Hkv, D, args.dry_run)
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            # SDPA's flash kernel gets kv heads repeated to Hq (same FLOPs as a GQA-aware kernel); forcing the
            # backend makes a silent fallback to the T^2-memory math path an error instead.
            ke, ve = (x.repeat_interleave(Hq // Hkv, dim=1).requires_grad_() for x in (k, v))
            scale = D**-0.5
            sdpa = {}
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                with flash():
                    sdpa[mode] = _bench(
                        lambda: torch.nn.functional.scaled_dot_product_attention(
                            qg, ke, ve, is_causal=True, scale=scale
                        ),
                        [qg, ke, ve],
                        backward,
                        do_bench,
                    )
            del ke, ve
            dense_pairs = T * (T + 1) // 2
            for c, K, m in args.params:
                selection = _time_selection(kern, q, k, c, K, m, kern.MSOptions(), do_bench)
                sel = selection.pop("sel")
                pairs = _ms_pairs(T, c, K, m)
                for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                    ms = _bench(
                        lambda: kern.ms_attention_triton(qg, kg, vg, sel, region_size=c, merge=m, scale=scale),
                        [qg, kg, vg],
                        backward,
                        do_bench,
                    )
                    op = _bench(  # the whole op as users call it: selection kernel + attention (+ backward)
                        lambda: kern.ms_attention(qg, kg, vg, region_size=c, top_k=K, merge=m, sink_regions=1,
                                                  scale=scale, backend="triton"),
                        [qg, kg, vg],
                        backward,
                        do_bench,
                    )
                    select_ms, select_kernel_ms = selection["select_ms"], selection["select_kernel_ms"]
                    factor = 4 * D * Hq * (3.5 if backward else 1.0)
                    row = {
                        "device": name, "Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "c": c, "K": K, "m": m, "mode": mode,
                        "sdpa_ms": round(sdpa[mode], 4), "ms_kernel_ms": round(ms, 4), **selection,
                        "op_ms": round(op, 4),
                        "sdpa_tflops": round(factor * dense_pairs / sdpa[mode] / 1e9, 1),
                        "ms_tflops": round(factor * pairs / ms / 1e9, 1),
                        "speedup_kernel": round(sdpa[mode] / ms, 2),
                        "speedup_end_to_end": round(sdpa[mode] / (ms + select_ms), 2),
                        "speedup_end_to_end_fused": round(sdpa[mode] / (ms + select_kernel_ms), 2),
                        "speedup_op": round(sdpa[mode] / op, 2),
                        "select_share_op": round(select_kernel_ms / op, 3),
                        "keys_per_query": round(pairs / T, 1),
                    }
                    rows.append(row)
                    print(row, flush=True)
                    _write_csv(rows, args.out / f"{args.name}.csv", FIELDS)
                del sel
            del q, k, v, qg, kg, vg
            if not args.dry_run:
                torch.cuda.empty_cache()
    return rows


def run_select(args) -> list[dict]:
    """The selection alone: PyTorch ``select_regions`` vs the selection kernel, select_per head and kv_group."""
    import torch

    do_bench, name, _ = _setup(args)
    kern = _import_kernels()
    rows = []
    for T in _lengths(args):
        for Hq, Hkv, D in args.heads:
            q, k, _ = _inputs(T, Hq, Hkv, D, args.dry_run)
            for c, K, m in args.params:
                for select_per in ("head", "kv_group"):
                    timed = _time_selection(kern, q, k, c, K, m, kern.MSOptions(select_per=select_per), do_bench)
                    del timed["sel"]
                    row = {"device": name, "Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "c": c, "K": K, "m": m,
                           "select_per": select_per, **timed}
                    rows.append(row)
                    print(row, flush=True)
                    _write_csv(rows, args.out / f"{args.name}_select.csv", SELECT_FIELDS)
            del q, k
            if not args.dry_run:
                torch.cuda.empty_cache()
    return rows


def _write_csv(rows: list[dict], path: Path, fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _select_kernel_cell(r: dict) -> str:
    """``ms (same)``, ``*`` where the sizes fell back to PyTorch; empty for rows measured before the kernel existed."""
    if r.get("select_kernel_ms") in (None, ""):
        return ""
    fallback = "" if str(r.get("select_fused", "True")) == "True" else " *"
    return f"{r['select_kernel_ms']} ({r['select_same']}){fallback}"


def write_markdown(rows: list[dict], path: Path) -> None:
    device = rows[0]["device"] if rows else "?"
    lines = [
        f"# Triton MS attention vs SDPA causal (flash), {device}",
        "",
        "B=1, bf16, causal, one sink region. Median ms of `triton.testing.do_bench`. `MS kernel` = Triton attention",
        "given the selection; `select` = `select_regions` in PyTorch; `select kernel` = the Triton selection kernel",
        "(`same` = its sel equals select_regions'; `*` = these sizes do not fit the kernel, it ran the PyTorch",
        "selection); end-to-end speedup = SDPA / (kernel + select), fused = SDPA / (kernel + select kernel);",
        "`op` = `ms_attention(backend=\"triton\")` timed as one call (selection kernel + attention), op speedup =",
        "SDPA / op, select share = select kernel / op.",
        "TFLOP/s: 4*D FLOPs per computed query-key pair forward, x3.5 for forward+backward.",
        "",
        "| Hq/Hkv/D | T | c/K/m | mode | SDPA ms | MS kernel ms | select ms | select kernel ms (same) | op ms "
        "| SDPA TFLOP/s | MS TFLOP/s | speedup (kernel) | speedup (end-to-end) | speedup (end-to-end, fused) "
        "| speedup (op) | select share of op | keys/query |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['Hq']}/{r['Hkv']}/{r['D']} | {r['T']} | {r['c']}/{r['K']}/{r['m']} | {r['mode']} | {r['sdpa_ms']} "
            f"| {r['ms_kernel_ms']} | {r['select_ms']} | {_select_kernel_cell(r)} | {r.get('op_ms', '')} "
            f"| {r['sdpa_tflops']} | {r['ms_tflops']} | {r['speedup_kernel']} | {r['speedup_end_to_end']} "
            f"| {r.get('speedup_end_to_end_fused', '')} | {r.get('speedup_op', '')} | {r.get('select_share_op', '')} "
            f"| {r['keys_per_query']} |"
        )
    notes = path.with_name(path.stem + "_notes.md")  # hand-written run notes (software versions), kept on re-render
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


def write_select_markdown(rows: list[dict], path: Path) -> None:
    device = rows[0]["device"] if rows else "?"
    lines = [
        f"# MS attention selection: `select_regions` (PyTorch) vs the Triton selection kernel, {device}",
        "",
        "B=1, bf16 inputs, one sink region. Median ms of `triton.testing.do_bench`. `same` = the kernel's sel equals",
        "select_regions'; `fused` = False where the sizes do not fit the kernel's registers and it ran the PyTorch",
        "selection instead (then the speedup is about 1).",
        "",
        "| Hq/Hkv/D | T | c/K/m | select_per | select_regions ms | selection kernel ms | fused | same | speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['Hq']}/{r['Hkv']}/{r['D']} | {r['T']} | {r['c']}/{r['K']}/{r['m']} | {r['select_per']} "
            f"| {r['select_ms']} | {r['select_kernel_ms']} | {r['select_fused']} | {r['select_same']} "
            f"| {r['select_speedup']} |"
        )
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
            for n, p in enumerate(sorted({(int(r["c"]), int(r["K"]), int(r["m"])) for r in sub})):
                mine = [r for r in sub if (int(r["c"]), int(r["K"]), int(r["m"])) == p]
                pts = {int(r["T"]): float(r["ms_kernel_ms"]) for r in mine}
                ts_p = sorted(pts)
                ax.plot(ts_p, [pts[t] for t in ts_p], "-o", color=f"C{n}",
                        label=f"MS Triton kernel c={p[0]} K={p[1]} m={p[2]}")
                ops = {int(r["T"]): float(r["op_ms"]) for r in mine if r.get("op_ms") not in (None, "")}
                if ops:  # the whole op, selection included (rows measured before op_ms existed have none)
                    ts_o = sorted(ops)
                    ax.plot(ts_o, [ops[t] for t in ts_o], "--s", color=f"C{n}", label=f"MS op (selection + kernel) "
                            f"c={p[0]} K={p[1]} m={p[2]}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (tokens)")
            ax.set_ylabel("median ms")
            ax.set_title(f"Hq={hd[0]} Hkv={hd[1]} D={hd[2]}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"MS attention Triton kernels and whole op vs SDPA, bf16, B=1 - {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="kernels_h100")
    parser.add_argument("--mode", choices=("all", "select"), default="all",
                        help="all: attention, selection and the whole op vs SDPA; select: the selection alone")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated T values")
    parser.add_argument("--max-t", type=int, default=None, help="drop lengths above this")
    parser.add_argument("--heads", type=_triples, default=_triples("32/8/128,8/8/64"), help="Hq/Hkv/D,...")
    parser.add_argument("--params", type=_triples, default=_triples("16/64/16,16/512/128"), help="c/K/m,...")
    parser.add_argument("--from-csv", type=Path, default=None, help="only re-render the Markdown and PNG of a CSV")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run every code path once on CPU under the Triton interpreter at a tiny shape "
                             "(T=160, 4/2/16, c/K/m 4/8/2), fp32, one call per time; checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        args.lengths, args.max_t = "160", None
        args.heads, args.params = _triples("4/2/16"), _triples("4/8/2")
    if args.from_csv is not None:
        rows = _read_csv(args.from_csv)
        base = args.from_csv.with_suffix("")
        if rows and "select_per" in rows[0]:
            write_select_markdown(rows, base.with_suffix(".md"))
            return 0
    else:
        import torch

        if not args.dry_run and not torch.cuda.is_available():
            print("benchmarks/kernels.py needs a CUDA GPU (Triton kernels vs SDPA flash): none found, nothing measured",
                  file=sys.stderr)
            return 1
        if args.mode == "select":
            rows = run_select(args)
            write_select_markdown(rows, (args.out / f"{args.name}_select").with_suffix(".md"))
            return 0
        rows = run(args)
        base = args.out / args.name
    write_markdown(rows, base.with_suffix(".md"))
    write_plot(rows, base.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
