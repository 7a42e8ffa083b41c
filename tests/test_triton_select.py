"""The Triton selection kernel (``kernels/select.py``) against ``select_regions``: identical ``sel`` for every option.

Under the interpreter (no GPU) each program costs a fraction of a second, so shapes are small; they are awkward
on purpose: T not a multiple of c, T shorter than one block, many blocks, GQA/MQA, sinks 0-3, candidate lists
longer than the minimum tile (several history tiles merged), exact ties, and both ways of taking the top lists.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ds_msattn.attention import select_regions  # noqa: E402
from ds_msattn.attention.options import MSOptions  # noqa: E402
from ds_msattn.kernels.function import interpreting  # noqa: E402
from ds_msattn.kernels.select import fits_kernel, select_regions_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"

# (B, Hq, Hkv, T, D, c, K, m, s, options)
CASES = [
    pytest.param(1, 2, 1, 75, 16, 4, 6, 2, 1, {}, id="mqa-T75-c4-m2-sink1"),
    pytest.param(1, 4, 2, 150, 16, 4, 8, 3, 0, dict(select_per="kv_group"), id="gqa-T150-m3-sink0-kv_group"),
    pytest.param(1, 2, 1, 123, 20, 4, 6, 1, 3, {}, id="mqa-T123-m1-sink3-many-blocks-D20"),
    pytest.param(1, 1, 1, 290, 16, 4, 24, 2, 1, {}, id="n21-list32-several-tiles"),
    pytest.param(2, 2, 2, 70, 16, 8, 5, 2, 2, dict(score="position_free", select_per="kv_group"),
                 id="B2-T70-c8-sink2-position_free-kv_group"),
    pytest.param(1, 2, 2, 5, 16, 4, 4, 2, 1, {}, id="T5-shorter-than-a-block"),
    pytest.param(1, 2, 1, 40, 16, 4, 3, 3, 1, {}, id="no-history-budget"),
    pytest.param(1, 1, 1, 45, 16, 4, 3, 1, 3, {}, id="sinks-fill-the-budget-n0"),
]


def _inputs(B, Hq, Hkv, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


@pytest.mark.parametrize("B,Hq,Hkv,T,D,c,K,m,s,options", CASES)
def test_selection_kernel_matches_select_regions(B, Hq, Hkv, T, D, c, K, m, s, options):
    q, k = _inputs(B, Hq, Hkv, T, D)
    kw = dict(region_size=c, top_k=K, merge=m, sink_regions=s, options=MSOptions(**options))
    if options.get("score") == "position_free":
        kw["rope_inv_freq"] = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D).float()
        kw["positions"] = torch.remainder(torch.arange(T) + 37, 64).expand(B, T)
    want = select_regions(q, k, **kw)
    dev = {key: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    got = select_regions_triton(q.to(DEVICE), k.to(DEVICE), **dev).cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_exact_ties_go_to_the_lower_region():
    """Key regions that repeat one pattern score exactly alike: the lower regions win, as in select_regions."""
    B, Hq, Hkv, T, D, c = 1, 2, 1, 96, 16, 4
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, Hq, T, D, generator=g)
    pattern = torch.randn(B, Hkv, 3 * c, D, generator=g)  # regions 0, 1, 2 repeat every 3 regions
    k = pattern.repeat(1, 1, T // (3 * c), 1)
    kw = dict(region_size=c, top_k=6, merge=2, sink_regions=0)
    want = select_regions(q, k, **kw)
    assert torch.equal(select_regions_triton(q.to(DEVICE), k.to(DEVICE), **kw).cpu(), want)
    assert (want[0, 0, -1] < 6).all()  # the three tied patterns resolved to the first regions showing them


@pytest.mark.skipif(DEVICE == "cuda", reason="the compiled kernel has only its compiled forms")
def test_compiled_and_numpy_forms_agree():
    """The kernel's compiled forms (tl.topk's bitonic network, tl.dot scores) and the interpreter's numpy forms
    (top lists by rank, scores by an elementwise sum) give the same selection."""
    q, k = _inputs(1, 1, 1, 30, 16, seed=2)
    kw = dict(region_size=4, top_k=4, merge=1, sink_regions=1)
    want = select_regions(q, k, **kw)
    assert torch.equal(select_regions_triton(q, k, **kw, numpy_forms=False), want)
    assert torch.equal(select_regions_triton(q, k, **kw, numpy_forms=True), want)


def test_large_lists_fall_back_to_pytorch():
    assert fits_kernel(16, 47) and not fits_kernel(128, 383)  # c16 K64 m16 fused; the paper's K512 m128 not
