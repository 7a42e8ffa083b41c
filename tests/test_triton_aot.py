"""Ahead-of-time compilation of the Triton MS attention kernels for sm_80 (A100) and sm_90 (H100), on CPU.

Triton compiles for an explicit GPU target without a driver (PTX and, with its bundled ptxas, cubin). This
checks what the interpreter cannot: that the kernels type-check and lower for real GPUs, and that the
largest autotuning configuration (head dim 128, bf16) fits the shared memory of each target, with and without
``far_positions`` (keys rotated on load), and the selection kernel. It runs in a subprocess because the
interpreter (TRITON_INTERPRET=1, set by conftest) replaces jitted functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # One process per target: compilation is CPU-bound and CI has two cores.
    procs = {
        cc: subprocess.Popen(
            [sys.executable, "-m", "ds_msattn.kernels.aot", cc], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for cc in ("80", "90")
    }
    result = {}
    for cc, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        result.update(json.loads(out.strip().splitlines()[-1]))
    limits = {"80": 163 * 1024, "90": 227 * 1024}
    assert sorted(result) == ["80", "90"]
    for cc, kernels in result.items():
        # *_moved: far_positions (keys rotated on load; dkdv_moved_1 compact, dkdv_moved_3 grouped).
        # select: the selection kernel (kernels/select.py) at c16 K64 m16.
        assert sorted(kernels) == ["dkdv", "dkdv_moved_1", "dkdv_moved_3", "dq", "dq_moved", "fwd", "fwd_moved",
                                   "select"]
        for name, info in kernels.items():
            assert info["ptx_target"], f"sm_{cc} {name}: PTX does not target sm_{cc}"
            assert info["cubin_bytes"] > 0, f"sm_{cc} {name}: no cubin"
            # tl.dot tiles are staged through shared memory: zero would mean the matmuls were not lowered.
            assert 0 < info["shared"] <= limits[cc], f"sm_{cc} {name}: shared memory {info['shared']} B"
