"""Ahead-of-time compilation of the MS attention kernels for a GPU target, without a GPU.

``python -m ds_msattn.kernels.aot [80 90]`` compiles the forward, dq and dk/dv kernels with their largest
autotuning configuration (head dim 128, bf16) to PTX and cubin with Triton's bundled ptxas, and prints the
shared memory each needs; ``*_moved`` are the same kernels with keys rotated on load (``far_positions``:
``grouped``, whose rotation is the general one, and ``compact`` for the dk/dv kernel); ``select`` is the
selection kernel at c16 K64 m16 (head dim 128, lists of 16 x 64). This catches what the interpreter cannot:
types, layouts, register and shared memory limits. TRITON_INTERPRET must be unset (the interpreter replaces
``@triton.jit`` functions).
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward import ms_attention_dkdv_kernel, ms_attention_dq_kernel
from .forward import ms_attention_fwd_kernel
from .function import DKDV_CONFIGS, QUERY_CONFIGS
from .rotary import MOVE_CODES
from .select import kernel_sizes as select_sizes
from .select import ms_select_kernel
from .select import num_warps as select_warps

#: Shared memory per block available to a kernel (bytes, opt-in maximum): A100 / H100.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_INTS = ["T", "NB", "S", "HQ", "G", "C", "MERGE", "MC", "D", "DV", "W", "GROUP"]


def _signature(pointers: dict[str, str], ints: list[str], floats: list[str], constexprs: list[str]) -> dict:
    sig = dict(pointers)
    sig.update({n: "i32" for n in ints})
    sig.update({n: "fp32" for n in floats})
    sig.update({n: "constexpr" for n in constexprs})
    return sig


def kernel_specs(head_dim: int = 128, dtype: str = "bf16", region_size: int = 16) -> dict:
    """``name -> (kernel, signature, constexprs, options)`` for the largest configuration of each kernel."""
    specs = _plain_specs(head_dim, dtype, region_size)
    for name, move in (("fwd", MOVE_CODES["grouped"]), ("dq", MOVE_CODES["grouped"]), ("dkdv", MOVE_CODES["compact"]),
                       ("dkdv", MOVE_CODES["grouped"])):
        fn, sig, constexprs, options = specs[name]
        key = f"{name}_moved" if name != "dkdv" else f"dkdv_moved_{move}"
        specs[key] = (fn, sig, {**constexprs, "MOVE": move}, options)
    select_sig = _signature({"QBAR": "*fp32", "KBAR": "*fp32", "SEL": "*i64"},
                            ["R", "NB", "HS", "HKV", "HQ", "MERGE", "BUDGET", "SINKS", "N", "D"], [],
                            ["BLOCK_MQ", "BLOCK_R", "LIST", "BLOCK_D", "BLOCK_S", "PREC", "TOP_BY_RANK",
                             "SCORE_BY_SUM"])
    # c16 K64 m16, one sink (n = 47). The largest lists taken (MAX_LIST_ENTRIES, e.g. 32 x 128) compile too but
    # take minutes of ptxas, too long for a test.
    fixed = {"PREC": "ieee", "TOP_BY_RANK": False, "SCORE_BY_SUM": False}
    sizes = select_sizes(16, 47, 48, head_dim)
    specs["select"] = (ms_select_kernel, select_sig, {**sizes, **fixed},
                       {"num_warps": select_warps(sizes), "num_stages": 2})
    return specs


def _plain_specs(head_dim: int, dtype: str, region_size: int) -> dict:
    t = "*" + dtype
    dot = {"DOT_DTYPE": {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype],
           "PREC": "ieee" if dtype == "fp32" else "tf32"}
    blocks = {"BLOCK_D": head_dim, "BLOCK_DV": head_dim}
    cexp = ["BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "DOT_DTYPE", "PREC", "MOVE"]
    bm, bn, warps, stages = max(QUERY_CONFIGS, key=lambda c: (c[0] * c[1], c[3]))
    query = {"BLOCK_M": bm, "BLOCK_N": bn, **blocks, **dot, "MOVE": 0}
    kv_bm, kv_warps, kv_stages = max(DKDV_CONFIGS, key=lambda c: (c[0], c[2]))
    return {
        "fwd": (
            ms_attention_fwd_kernel,
            _signature({"Q": t, "K": t, "V": t, "SEL": "*i64", "O": t, "LSE2": "*fp32", "ROT": "*fp32"}, _INTS,
                       ["scale_log2e"], cexp),
            query,
            {"num_warps": warps, "num_stages": stages},
        ),
        "dq": (
            ms_attention_dq_kernel,
            _signature(
                {"Q": t, "K": t, "V": t, "SEL": "*i64", "DO": t, "LSE2": "*fp32", "DELTA": "*fp32", "DQ": t,
                 "ROT": "*fp32"},
                _INTS, ["scale", "scale_log2e"], cexp,
            ),
            query,
            {"num_warps": warps, "num_stages": stages},
        ),
        "dkdv": (
            ms_attention_dkdv_kernel,
            _signature(
                {"Q": t, "K": t, "V": t, "DO": t, "LSE2": "*fp32", "DELTA": "*fp32", "OFFSETS": "*i32",
                 "ENTRIES": "*i32", "DK": t, "DV_OUT": t, "SLOTS": "*i32", "ROT": "*fp32"},
                ["T", "NB", "R", "HQ", "G", "C", "MERGE", "MC", "D", "DV", "S", "W", "GROUP"], ["scale", "scale_log2e"],
                cexp,
            ),
            {"BLOCK_M": kv_bm, "BLOCK_N": max(16, triton.next_power_of_2(region_size)), **blocks, **dot, "MOVE": 0},
            {"num_warps": kv_warps, "num_stages": kv_stages},
        ),
    }


def compile_for(capability: int, head_dim: int = 128, dtype: str = "bf16") -> dict[str, dict]:
    """Compile every kernel for ``sm_<capability>``; per kernel: shared bytes, PTX and cubin sizes."""
    out = {}
    for name, (fn, sig, constexprs, options) in kernel_specs(head_dim, dtype).items():
        compiled = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=constexprs),
            target=GPUTarget("cuda", capability, 32),
            options=options,
        )
        out[name] = {
            "shared": compiled.metadata.shared,
            "ptx_target": f".target sm_{capability}" in compiled.asm["ptx"],
            "ptx_chars": len(compiled.asm["ptx"]),
            "cubin_bytes": len(compiled.asm["cubin"]),
            "limit": SHARED_LIMIT.get(capability),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    caps = [int(a) for a in (sys.argv[1:] if argv is None else argv)] or [80, 90]
    print(json.dumps({cc: compile_for(cc) for cc in caps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
