"""MS attention: the fast torch path and the vectorised selection against the float64 reference."""

import math

import pytest
import torch

from ds_msattn import ms_attention
from ds_msattn.attention import reference_selection, select_regions, selection, torch_path

# (B, Hq, Hkv, T, D, Dv, c, K, m, s)
CASES = [
    pytest.param(1, 1, 1, 1, 16, 16, 4, 4, 2, 1, id="T1"),
    pytest.param(2, 4, 2, 111, 16, 16, 4, 6, 2, 1, id="gqa2-T111-sparse"),
    pytest.param(3, 2, 1, 63, 12, 12, 4, 5, 1, 0, id="B3-D12-m1-nosink"),
    pytest.param(1, 8, 1, 200, 8, 8, 8, 4, 1, 1, id="mqa8-T200"),
    pytest.param(1, 8, 8, 97, 60, 60, 16, 4, 2, 2, id="D60-T97-sink2"),
    pytest.param(2, 6, 3, 150, 16, 16, 4, 8, 3, 1, id="gqa3-m3"),
    pytest.param(1, 4, 4, 130, 16, 16, 4, 3, 3, 1, id="merge-eq-topk"),
    pytest.param(1, 2, 2, 120, 16, 16, 4, 4, 1, 5, id="sinks-exceed-budget"),
    pytest.param(1, 3, 1, 90, 16, 24, 4, 6, 2, 1, id="Dv24-generic"),
    pytest.param(2, 2, 2, 64, 16, 16, 4, 64, 2, 1, id="dense-regime"),
]


def _inputs(B, Hq, Hkv, T, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=g).to(dtype)
    return q, k, v


def _run(q, k, v, do, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = ms_attention(q, k, v, **kw)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _selection_lists(sel):
    return [[[[j for j in row if j >= 0] for row in head] for head in batch] for batch in sel.tolist()]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,Dv,c,K,m,s", CASES)
def test_selection_matches_reference(B, Hq, Hkv, T, D, Dv, c, K, m, s):
    q, k, _ = _inputs(B, Hq, Hkv, T, D, Dv)
    p = dict(region_size=c, top_k=K, merge=m, sink_regions=s)
    assert _selection_lists(select_regions(q, k, **p)) == reference_selection(q, k, **p)


def test_selection_is_chunk_invariant(monkeypatch):
    q, k, _ = _inputs(2, 4, 2, 300, 16, 16)
    p = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    whole = select_regions(q, k, **p)
    monkeypatch.setattr(selection, "SCORE_BUDGET", 1)
    assert torch.equal(select_regions(q, k, **p, score_budget=1), whole)


def test_selection_ties_go_to_lower_regions():
    q = torch.zeros(1, 2, 64, 8)
    k = torch.randn(1, 1, 64, 8)
    k[:, :, :, :] = 1.0  # every score equal (zero queries): ties everywhere
    p = dict(region_size=4, top_k=5, merge=1, sink_regions=0)
    sel = select_regions(q, k, **p)
    assert _selection_lists(sel) == reference_selection(q, k, **p)
    assert sel[0, 0, -1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("levels", [3, 7, 1000, None], ids=["ties3", "ties7", "rare-ties", "continuous"])
def test_top_ranked_equals_the_order_key_rule(levels):
    """The float topk path (with its tie fallback) ranks exactly as the int64 order keys: set, order, ties."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 3, 9, 40, generator=g)
    if levels is not None:  # few distinct values: ties inside the chosen set and at its threshold
        scores = torch.randint(0, levels, scores.shape, generator=g).float() * 0.5 - 1.0
    scores[0, 0, 0] = -0.0  # -0.0 ties with +0.0
    valid = torch.rand(9, 40, generator=g) > 0.3
    valid[:, :12] = True  # every row has at least n candidates
    for n in (1, 5, 12):
        want = selection._top_by_keys(scores.clone(), valid, n)
        assert torch.equal(selection.top_ranked(scores.clone(), valid, n), want)


def test_selection_is_a_set_of_distinct_regions():
    q, k, _ = _inputs(2, 4, 2, 256, 16, 16, seed=3)
    sel = select_regions(q, k, region_size=4, top_k=10, merge=4, sink_regions=1)
    R = 64
    for row in sel.reshape(-1, sel.shape[-1]).tolist():
        valid = [j for j in row if j >= 0]
        assert len(valid) == len(set(valid)) and all(0 <= j < R for j in valid)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "generic"])
@pytest.mark.parametrize("B,Hq,Hkv,T,D,Dv,c,K,m,s", CASES)
def test_torch_path_matches_reference(B, Hq, Hkv, T, D, Dv, c, K, m, s, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(torch_path, "_use_cpu_flash", lambda q, v: False)
    q, k, v = _inputs(B, Hq, Hkv, T, D, Dv)
    do = torch.randn(B, Hq, T, Dv, generator=torch.Generator().manual_seed(1))
    p = dict(region_size=c, top_k=K, merge=m, sink_regions=s)
    fast = _run(q, k, v, do, backend="torch", **p)
    ref = _run(q, k, v, do, backend="reference", **p)
    for name, a, b in zip(("o", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda e, n=name: f"{n}: {e}")


GROUPED = [case for case in CASES if case.values[1] > case.values[2]]  # G = Hq / Hkv > 1


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "generic"])
@pytest.mark.parametrize("B,Hq,Hkv,T,D,Dv,c,K,m,s", GROUPED)
def test_torch_path_gathers_once_per_kv_group(B, Hq, Hkv, T, D, Dv, c, K, m, s, fused, monkeypatch):
    """``select_per="kv_group"``: the G query heads of a kv head attend as one G*m*c-row tile over regions gathered
    once; outputs and gradients still match the reference (the generic path too, Dv != D included)."""
    if not fused:
        monkeypatch.setattr(torch_path, "_use_cpu_flash", lambda q, v: False)
    shared = []
    stack = torch_path._Geometry.stack
    monkeypatch.setattr(torch_path._Geometry, "stack", lambda self, x: shared.append(self.share) or stack(self, x))
    q, k, v = _inputs(B, Hq, Hkv, T, D, Dv, seed=3)
    do = torch.randn(B, Hq, T, Dv, generator=torch.Generator().manual_seed(4))
    p = dict(region_size=c, top_k=K, merge=m, sink_regions=s, select_per="kv_group")
    fast = _run(q, k, v, do, backend="torch", **p)
    ref = _run(q, k, v, do, backend="reference", **p)
    for name, a, b in zip(("o", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda e, n=name: f"{n}: {e}")
    assert shared and all(shared)  # forward and backward both took the shared path


def test_heads_that_select_alike_share_their_gather():
    """Sharing is decided from ``sel`` itself: query heads with equal selections (here equal queries, per-head rule)
    share; one differing head turns it off."""
    q, k, v = _inputs(1, 4, 2, 150, 16, 16, seed=6)
    q = q[:, ::2].repeat_interleave(2, dim=1)  # the two heads of each kv head are equal
    p = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    sel = select_regions(q, k, **p)
    assert torch_path.shares_groups(sel, 2)
    q[:, 1] = torch.randn(150, 16, generator=torch.Generator().manual_seed(7))
    assert not torch_path.shares_groups(select_regions(q, k, **p), 2)
    assert not torch_path.shares_groups(sel, 4)  # G = 1: nothing to share


def test_torch_path_across_chunk_boundaries(monkeypatch):
    """Tiny chunk budget: every query block is its own chunk (gather/scatter at chunk edges)."""
    monkeypatch.setattr(torch_path, "CHUNK_BUDGET", 1)
    q, k, v = _inputs(2, 4, 2, 150, 16, 16, seed=5)
    do = torch.randn(2, 4, 150, 16)
    p = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    fast = _run(q, k, v, do, backend="torch", **p)
    ref = _run(q, k, v, do, backend="reference", **p)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_path_low_precision(dtype):
    """Error of the fast path in low precision at most 2x that of the same math done plainly in that dtype."""
    q, k, v = _inputs(2, 4, 2, 111, 16, 16, dtype=dtype, seed=2)
    do = torch.randn(2, 4, 111, 16).to(dtype)
    p = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    fast = _run(q, k, v, do, backend="torch", **p)
    ref = _run(q.double(), k.double(), v.double(), do.double(), backend="reference", **p)
    # Plain computation in the low dtype: round the float64 result to it.
    for a, b in zip(fast, ref):
        assert a.dtype == dtype
        err = (a.double() - b).abs().max().item()
        rounding = (b.to(dtype).double() - b).abs().max().item()
        assert err <= 2 * rounding + 1e-2 * b.abs().max().item(), (err, rounding)


def test_dense_regime_equals_causal_sdpa():
    q, k, v = _inputs(2, 6, 2, 77, 16, 16, seed=4)
    o = ms_attention(q, k, v, region_size=8, top_k=16, merge=2, backend="torch")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_sparse_regime_differs_from_dense():
    q, k, v = _inputs(1, 2, 2, 128, 16, 16, seed=6)
    o = ms_attention(q, k, v, region_size=4, top_k=4, merge=1, backend="torch")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (o - ref).abs().max() > 1e-2


def test_output_is_independent_of_other_batch_rows():
    q, k, v = _inputs(3, 2, 1, 100, 16, 16, seed=7)
    p = dict(region_size=4, top_k=5, merge=2, backend="torch")
    full = ms_attention(q, k, v, **p)
    torch.testing.assert_close(full[1:2], ms_attention(q[1:2], k[1:2], v[1:2], **p))


def test_explicit_scale():
    q, k, v = _inputs(1, 2, 1, 50, 16, 16)
    p = dict(region_size=4, top_k=4, merge=2, scale=0.3)
    torch.testing.assert_close(
        ms_attention(q, k, v, backend="torch", **p), ms_attention(q, k, v, backend="reference", **p), atol=1e-5, rtol=1e-5
    )


def test_backward_memory_bounded_structure():
    """The autograd graph keeps only inputs, output, lse and sel: no gathered [T, K*c] tiles."""
    q, k, v = _inputs(1, 2, 1, 512, 16, 16)
    q.requires_grad_()
    o = ms_attention(q, k, v, region_size=4, top_k=8, merge=2, backend="torch")
    saved = o.grad_fn.saved_tensors
    T = 512
    for t in saved:
        assert t.numel() <= 2 * T * 16 * 2, t.shape  # nothing of size T*K*c*D or T*K*c


BAD = [
    (dict(region_size=0), "region_size"),
    (dict(top_k=-1), "top_k"),
    (dict(merge=0), "merge"),
    (dict(merge=5, top_k=4), "merge"),
    (dict(sink_regions=-1), "sink_regions"),
    (dict(region_size=2.5), "region_size"),
    (dict(backend="cuda"), "backend"),
    (dict(scale=-1.0), "scale"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_parameters_name_themselves(kw, name):
    q, k, v = _inputs(1, 2, 1, 16, 8, 8)
    p = dict(region_size=4, top_k=4, merge=2) | kw
    with pytest.raises(ValueError, match=name):
        ms_attention(q, k, v, **p)


def test_bad_tensors_name_themselves():
    q, k, v = _inputs(1, 4, 2, 16, 8, 8)
    p = dict(region_size=4, top_k=4, merge=2)
    with pytest.raises(ValueError, match="4 dimensions"):
        ms_attention(q[0], k, v, **p)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        ms_attention(q[:, :3], k, v, **p)
    with pytest.raises(ValueError, match="head dim"):
        ms_attention(q, k[..., :4], v, **p)
    with pytest.raises(ValueError, match="sequence lengths"):
        ms_attention(q, k[:, :, :8], v, **p)
    with pytest.raises(ValueError, match="dtype"):
        ms_attention(q, k.double(), v, **p)
    with pytest.raises(ValueError, match="floating point"):
        ms_attention(q, k.long(), v, **p)
    with pytest.raises(ValueError, match="batch"):
        ms_attention(q, k[:0], v, **p)


def test_triton_backend_on_cpu_is_clear():
    """Without the kernels (or CUDA), backend='triton' either runs (interpreter) or says why."""
    q, k, v = _inputs(1, 2, 1, 32, 16, 16)
    try:
        out = ms_attention(q, k, v, region_size=4, top_k=4, merge=2, backend="triton")
    except NotImplementedError as e:
        assert "triton" in str(e)
    else:
        torch.testing.assert_close(out, ms_attention(q, k, v, region_size=4, top_k=4, merge=2, backend="reference"), atol=1e-4, rtol=1e-4)


def test_selected_budget_bounds_keys_per_query():
    T, c, K, m = 1000, 8, 6, 2
    q, k, _ = _inputs(1, 1, 1, T, 8, 8)
    sel = select_regions(q, k, region_size=c, top_k=K, merge=m)
    assert sel.shape == (1, 1, math.ceil(math.ceil(T / c) / m), K - m)
    assert ((sel >= 0).sum(-1) <= K - m).all()
