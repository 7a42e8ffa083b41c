"""Triton MS attention kernels against the float64 reference and the torch path: outputs and dq, dk, dv.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before triton
is imported); with one they run compiled, and the same cases check the real code path (bf16 tensor-core dots).
Shapes are small and awkward on purpose: T not a multiple of c, a short last region, GQA, B=2, head dims
that need padding, Dv != D, T=1, blocks of more than one query tile, dense and sparse selections.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from ds_msattn.attention import ms_attention, ms_attention_reference, select_regions  # noqa: E402
from ds_msattn.attention.torch_path import ms_attention_torch  # noqa: E402
from ds_msattn.kernels import ms_attention_triton  # noqa: E402
from ds_msattn.kernels.backward import reverse_index  # noqa: E402
from ds_msattn.kernels.function import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
# Largest error, relative to the reference's largest magnitude, allowed per input dtype. bf16 inputs are
# rounded once (so the reference sees the same values); the rest is the output rounding and bf16 matmul
# inputs (p, ds) on the GPU.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# (id, B, Hq, Hkv, T, D, Dv, region_size, top_k, merge, sink_regions)
CASES = [
    pytest.param(2, 4, 2, 75, 16, 16, 8, 6, 2, 1, id="gqa-B2-T75-c8-sparse-sink1"),
    pytest.param(1, 2, 2, 61, 20, 20, 4, 4, 1, 0, id="mha-T61-c4-m1-sink0-D20"),
    pytest.param(1, 3, 1, 40, 32, 32, 8, 6, 2, 1, id="dense-K*c>=T-mqa"),
    pytest.param(1, 2, 1, 150, 16, 32, 16, 10, 8, 1, id="two-tiles-per-block-c16-m8-Dv32"),
    pytest.param(1, 2, 2, 1, 16, 16, 4, 4, 2, 1, id="T1"),
]


def _inputs(B, Hq, Hkv, T, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    do = torch.randn(B, Hq, T, Dv, generator=g)
    return [x.to(dtype) for x in (q, k, v, do)]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    # Floor 0.1: inputs are O(1), and a gradient that is exactly zero (dq at T=1) has only rounding error.
    return (a.double().cpu() - ref.double().cpu()).abs().max().item() / max(ref.abs().max().item(), 0.1)


def _run(fn, q, k, v, do, device=DEVICE):
    q, k, v = (x.detach().to(device).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(device))
    return [x.detach().cpu() for x in (o, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,Hq,Hkv,T,D,Dv,c,K,m,s", CASES)
def test_triton_matches_reference_and_torch_path(B, Hq, Hkv, T, D, Dv, c, K, m, s, dtype):
    q, k, v, do = _inputs(B, Hq, Hkv, T, D, Dv, dtype)
    params = dict(region_size=c, top_k=K, merge=m, sink_regions=s)
    scale = D**-0.5
    # Reference in float64 on the same (already rounded) inputs.
    ref = _run(lambda q, k, v: ms_attention_reference(q.double(), k.double(), v.double(), scale=scale, **params),
               q, k, v, do.double(), device="cpu")

    def triton_fn(q, k, v):
        sel = select_regions(q, k, **params)
        return ms_attention_triton(q, k, v, sel, region_size=c, merge=m, scale=scale)

    got = _run(triton_fn, q, k, v, do)
    for name, a, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        err = _rel_err(a, r)
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"

    # The torch path attends to the same regions (shared selection); both must agree with each other too.
    def torch_fn(q, k, v):
        sel = select_regions(q, k, **params)
        return ms_attention_torch(q, k, v, sel, region_size=c, merge=m, scale=scale)

    other = _run(torch_fn, q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, other):
        err = _rel_err(a, b)
        assert err <= 2 * TOL[dtype], f"{name} vs torch path: relative error {err:.2e}"


def test_fp16_inputs():
    """fp16 takes the bf16 code path with another dot dtype: one sparse GQA case against the reference."""
    q, k, v, do = _inputs(1, 4, 2, 70, 16, 16, torch.float16, seed=11)
    params = dict(region_size=8, top_k=6, merge=2, sink_regions=1)
    ref = _run(lambda q, k, v: ms_attention_reference(q.double(), k.double(), v.double(), **params),
               q, k, v, do.double(), device="cpu")
    got = _run(lambda q, k, v: ms_attention_triton(q, k, v, select_regions(q, k, **params), region_size=8, merge=2),
               q, k, v, do)
    for name, a, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.float16, name
        err = _rel_err(a, r)
        assert err <= TOL[torch.float16], f"{name}: relative error {err:.2e}"


def test_dense_case_equals_sdpa_causal():
    """With every history inside the budget, MS attention is exactly causal attention."""
    B, Hq, Hkv, T, D = 1, 2, 2, 48, 16
    q, k, v, do = _inputs(B, Hq, Hkv, T, D, D, torch.float32, seed=3)
    sel = select_regions(q, k, region_size=8, top_k=8, merge=2, sink_regions=1)
    for blk in range(sel.shape[2]):  # every block selects its whole history
        assert sel[0, 0, blk, : 2 * blk].tolist() == list(range(2 * blk)) and (sel[:, :, blk, 2 * blk :] == -1).all()
    got = _run(lambda q, k, v: ms_attention_triton(q, k, v, sel.to(q.device), region_size=8, merge=2, scale=0.3),
               q, k, v, do)
    want = _run(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
                q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert _rel_err(a, b) <= 2e-5, name


def test_api_dispatches_triton_backend():
    q, k, v, _ = _inputs(1, 4, 2, 37, 16, 16, torch.float32, seed=1)
    q, k, v = (x.to(DEVICE) for x in (q, k, v))
    params = dict(region_size=4, top_k=5, merge=2, sink_regions=1)
    a = ms_attention(q, k, v, backend="triton", **params)
    b = ms_attention(q, k, v, backend="reference", **params)
    assert _rel_err(a, b) <= TOL[torch.float32]


def test_reverse_index_lists_every_selection_once():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 90, 8, generator=g), torch.randn(2, 2, 90, 8, generator=g)
    sel = select_regions(q, k, region_size=4, top_k=6, merge=2, sink_regions=1)  # [2, 4, 12, 4]
    B, Hq, NB, S = sel.shape
    R = math.ceil(90 / 4)
    offsets, entries = reverse_index(sel, 2, R)
    assert offsets.shape == (B * 2 * R + 1,) and offsets[-1] == (sel >= 0).sum()
    for b in range(B):
        for g_ in range(2):
            for r in range(R):
                i = (b * 2 + g_) * R + r
                got = entries[offsets[i] : offsets[i + 1]].tolist()
                want = [h * NB + blk for h in range(g_ * 2, g_ * 2 + 2) for blk in range(NB) if r in sel[b, h, blk]]
                assert got == want, (b, g_, r)


def test_bad_inputs_raise_value_error():
    q, k, v, _ = _inputs(1, 2, 2, 16, 16, 16, torch.float32)
    sel = select_regions(q, k, region_size=4, top_k=4, merge=2)
    with pytest.raises(ValueError, match="head dim D"):
        big = torch.zeros(1, 2, 16, 512)
        ms_attention_triton(big, big, big, sel, region_size=4, merge=2, scale=1.0)
    with pytest.raises(ValueError, match="sel must be int64"):
        ms_attention_triton(q, k, v, sel[:, :, :1], region_size=4, merge=2, scale=1.0)
    with pytest.raises(ValueError, match="region_size"):
        ms_attention_triton(q, k, v, sel, region_size=0, merge=2, scale=1.0)
    with pytest.raises(ValueError, match="dtype"):
        ms_attention_triton(q.double(), k.double(), v.double(), sel, region_size=4, merge=2, scale=1.0)


@pytest.mark.skipif(DEVICE != "cuda", reason="determinism of compiled kernels needs a GPU")
def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 8, 2, 1000, 64, 64, torch.bfloat16, seed=5)
    params = dict(region_size=16, top_k=8, merge=2, sink_regions=1)

    def fn(q, k, v):
        return ms_attention_triton(q, k, v, select_regions(q, k, **params), region_size=16, merge=2, scale=0.125)

    first, second = _run(fn, q, k, v, do), _run(fn, q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="realistic sizes need a GPU")
def test_realistic_shape_matches_torch_path():
    """Paper-like heads and tiles (autotuned BLOCK_M up to 128, several tiles per block) against the torch path."""
    q, k, v, do = _inputs(1, 32, 8, 4000, 128, 128, torch.bfloat16, seed=7)
    params = dict(region_size=16, top_k=64, merge=16, sink_regions=1)

    def make(fn):
        return lambda q, k, v: fn(q, k, v, select_regions(q, k, **params), region_size=16, merge=16, scale=128**-0.5)

    got = _run(make(ms_attention_triton), q, k, v, do)
    # The torch path on CUDA computes in fp32 from the same bf16 inputs: a float32-quality reference here.
    want = _run(make(ms_attention_torch), q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        err = _rel_err(a, b)
        assert err <= TOL[torch.bfloat16], f"{name}: relative error {err:.2e}"


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with 48 GiB free")
def test_offsets_past_int32():
    """B*Hq*T*D > 2**31: the last batch element must equal the same element computed alone (int64 offsets)."""
    free = torch.cuda.mem_get_info()[0]
    if free < 48 * 2**30:
        pytest.skip(f"needs 48 GiB free GPU memory, has {free / 2**30:.0f}")
    B, Hq, Hkv, T, D = 5, 32, 8, 131072, 128
    assert B * Hq * T * D > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    params = dict(region_size=16, top_k=16, merge=4, sink_regions=1)
    sel = select_regions(q, k, **params)
    qg, kg, vg = (x.requires_grad_() for x in (q, k, v))
    do = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    o = ms_attention_triton(qg, kg, vg, sel, region_size=16, merge=4, scale=0.1)
    o.backward(do)
    q1, k1, v1 = (x[-1:].detach().clone().requires_grad_() for x in (q, k, v))
    o1 = ms_attention_triton(q1, k1, v1, sel[-1:], region_size=16, merge=4, scale=0.1)
    o1.backward(do[-1:])
    assert torch.equal(o[-1:], o1)
    for a, b in ((qg.grad[-1:], q1.grad), (kg.grad[-1:], k1.grad), (vg.grad[-1:], v1.grad)):
        assert torch.equal(a, b)


def _rope(x, positions, freqs):
    """Rotate ``x [B, H, T, D]`` at ``positions [B, T]`` (transformers' rotate_half, fp32 angles)."""
    angle = positions.float()[:, None, :, None] * freqs.float()
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


# far_positions (docs/design.md, "Options of MS attention beyond the paper"): keys rotated on load in the kernels.
# (B, Hq, Hkv, T, D, c, K, m, s, options, wrapped positions, dtype)
FAR_CASES = [
    pytest.param(1, 4, 2, 77, 16, 8, 5, 2, 1, dict(far_positions="compact"), False, torch.float32,
                 id="gqa-T77-c8-compact"),
    pytest.param(1, 2, 1, 61, 20, 4, 5, 1, 2, dict(far_positions="capped", far_window=6, score="position_free"), True,
                 torch.float32, id="mqa-T61-c4-m1-sink2-D20-capped-position_free-wrapped"),
    pytest.param(2, 2, 2, 70, 16, 8, 7, 2, 0, dict(far_positions="grouped", far_window=8, far_group=3), False,
                 torch.float32, id="B2-T70-sink0-grouped-two-key-tiles"),
    pytest.param(1, 4, 1, 75, 16, 8, 6, 2, 1, dict(far_positions="compact", score="position_free",
                                                  select_per="kv_group"), True, torch.bfloat16,
                 id="mqa-T75-compact-position_free-kv_group-bf16-wrapped"),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,c,K,m,s,options,wrapped,dtype", FAR_CASES)
def test_far_positions_match_reference(B, Hq, Hkv, T, D, c, K, m, s, options, wrapped, dtype):
    """Selected keys moved in the kernels (forward, dq, dk/dv) against the float64 reference, through the API."""
    g = torch.Generator().manual_seed(2)
    freqs = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D).float()
    positions = torch.arange(T).expand(B, T)
    if wrapped:  # CRD-NTK-like: shifted, wrapped positions
        positions = torch.remainder(torch.arange(T) + 37, 64).expand(B, T)
    q = _rope(torch.randn(B, Hq, T, D, generator=g), positions, freqs).to(dtype)
    k = _rope(torch.randn(B, Hkv, T, D, generator=g), positions, freqs).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    kw = dict(region_size=c, top_k=K, merge=m, sink_regions=s, rope_inv_freq=freqs, position_ids=positions, **options)
    ref = _run(lambda q, k, v: ms_attention(q.double(), k.double(), v.double(), backend="reference", **kw),
               q, k, v, do.double(), device="cpu")
    kw_dev = {**kw, "rope_inv_freq": freqs.to(DEVICE), "position_ids": positions.to(DEVICE)}
    got = _run(lambda q, k, v: ms_attention(q, k, v, backend="triton", **kw_dev), q, k, v, do)
    exact = _run(lambda q, k, v: ms_attention(q.double(), k.double(), v.double(), backend="reference",
                                              **{**kw, "far_positions": "exact"}), q, k, v, do.double(), device="cpu")
    for name, a, r, e in zip(("o", "dq", "dk", "dv"), got, ref, exact):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err = _rel_err(a, r)
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"
        assert _rel_err(e, r) > 5 * TOL[dtype], f"{name}: the case does not tell the moved keys from exact ones"


def test_far_positions_rejects_a_mover_of_another_call():
    from ds_msattn.attention.options import KeyMover, MSOptions

    q, k, v, _ = _inputs(1, 2, 2, 16, 16, 16, torch.float32)
    sel = select_regions(q, k, region_size=4, top_k=4, merge=2)
    mover = KeyMover(MSOptions(far_positions="compact"), torch.ones(8), region_size=4, merge=1)
    with pytest.raises(ValueError, match="mover was made for"):
        ms_attention_triton(q, k, v, sel, region_size=4, merge=2, mover=mover)
