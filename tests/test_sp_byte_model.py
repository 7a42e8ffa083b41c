"""The region-sharding byte model of benchmarks/sp_scaling.py: hand-computed small cases, and the code's counts.

Case (all by hand below): T=128 on P=4 ranks, Hq=4, Hkv=2 (G=2), D=8, c=4, K=6, m=2, one sink, bf16 (2 bytes).
Tl = ceil(128 / (4*2*4)) * 2*4 = 32 tokens per rank, Rl = 8 regions, NBl = 4 blocks; budget K-m = 4, sinks 1,
n = 3. The last rank (r=3) has 24 remote history regions; its first block (12) is sparse (12*2 > 4).
- kv_group: one selection per kv head and block: U <= 1 + 4*3 = 13 < 24, so U = 13 per kv head;
- head: G=2 selections per kv head and block: 1 + 2*4*3 = 25, capped by the history: U = 24.
Bytes: data 2 * Hkv * U * c * 2D * 2 (k, v in; dk, dv out), kbar (P-1) * Hkv * Rl * D * 4 = 1536,
meta 8*(P-1) + 8 * Hkv * U.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sp_scaling", ROOT / "benchmarks" / "sp_scaling.py")
sp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sp)

SMALL = dict(Hq=4, Hkv=2, D=8, c=4, K=6, m=2, s=1, elem=2)


def test_kv_group_bytes_hand_computed():
    data = 2 * 2 * 13 * 4 * 16 * 2  # 6656
    assert sp.region_bytes(128, 4, **SMALL, select_per="kv_group") == (data + 1536 + 24 + 8 * 2 * 13, 26)
    assert sp.region_bytes(128, 4, **SMALL, select_per="kv_group") == (8424, 26)


def test_head_bytes_hand_computed_and_default():
    assert sp.region_bytes(128, 4, **SMALL, select_per="head") == (12288 + 1536 + 24 + 8 * 2 * 24, 48)
    assert sp.region_bytes(128, 4, **SMALL) == sp.region_bytes(128, 4, **SMALL, select_per="head")


def test_fetch_bounds_per_rank_and_busiest():
    kw = {k: SMALL[k] for k in ("Hq", "Hkv", "c", "K", "m", "s")}
    # r=0 fetches nothing; r=1: 8 remote regions, 1 + 12 = 13 > 8, all of them; r=2, 3: 13
    assert [sp.fetch_regions_bound(128, 4, **kw, select_per="kv_group", rank=r) for r in range(4)] == [0, 8, 13, 13]
    assert [sp.fetch_regions_bound(128, 4, **kw, select_per="head", rank=r) for r in range(4)] == [0, 8, 16, 24]
    # busiest, kv_group: rank 0 serves 8 + 8 + 8 = 24, rank 1 fetches 8 and serves 8 + 8: 24 each (the later wins)
    moved = 24
    expect = 2 * 2 * moved * 4 * 16 * 2 + 1536 + 24 + 8 * 2 * moved
    assert sp.region_busiest_bytes(128, 4, **SMALL, select_per="kv_group") == (expect, 1)


def test_dense_histories_are_the_same_for_head_and_kv_group():
    # T=32 on 2 ranks: Tl=16, Rl=4, rank 1's first block is block 2, 2*2 <= 4: the whole history, exactly
    for select_per in ("head", "kv_group"):
        assert sp.region_bytes(32, 2, **SMALL, select_per=select_per) == (2 * 2 * 4 * 4 * 16 * 2 + 256 + 8 + 64, 8)


def test_kv_group_never_above_head_and_rejects_unknown():
    for P in sp.MODEL_P:
        for T in sp.MODEL_T:
            kw = dict(Hq=32, Hkv=8, D=128, **sp.PAPER)
            assert sp.region_bytes(T, P, **kw, select_per="kv_group") <= sp.region_bytes(T, P, **kw)
    with pytest.raises(ValueError, match="select_per"):
        sp.fetch_regions_bound(128, 4, Hq=4, Hkv=2, c=4, K=6, m=2, select_per="query")


def _sharded_counts(rank, world, T):
    return {select_per: _one_call(rank, world, T, select_per) for select_per in ("kv_group", "head")}


def _one_call(rank, world, T, select_per):
    import torch

    from ds_msattn.parallel.region_shard import TrafficStats, region_sharded_attention

    Hq, Hkv, D, c, K, m = 4, 2, 8, 4, 6, 2
    Tl = math.ceil(T / (world * m * c)) * m * c
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, world * Tl, D, generator=g)[:, :, rank * Tl : (rank + 1) * Tl].contiguous()
               .requires_grad_() for h in (Hq, Hkv, Hkv))
    stats = TrafficStats()
    out = region_sharded_attention(q, k, v, region_size=c, top_k=K, merge=m, sink_regions=1, valid_len=T,
                                   stats=stats, select_per=select_per)
    out.sum().backward()
    return stats.totals()


@functools.cache
def _counts(T, P):
    from ds_msattn.parallel.spawn import run_ranks

    return run_ranks(_sharded_counts, P, T)


@pytest.mark.parametrize("select_per", ["kv_group", "head"])
def test_model_bounds_what_region_shard_sends(select_per):
    """2 gloo ranks, T=128 (Tl=64, Rl=16, NBl=8, last rank sparse): the exchange's own counts against the model."""
    T, P = 128, 2
    last = _counts(T, P)[-1][select_per]
    model, bound_pairs = sp.region_bytes(T, P, **dict(SMALL, elem=4), select_per=select_per)
    assert 0 < last["regions_fetched"] <= bound_pairs
    per_region = 4 * 2 * 8 * 4  # c * (D + Dv) * fp32
    assert last["kv_recv"] == last["grad_sent"] == last["regions_fetched"] * per_region
    assert last["meta_sent"] == 8 * (P - 1) + 8 * last["regions_fetched"]
    measured = last["kv_recv"] + last["grad_sent"] + last["kbar"] + last["meta_sent"]
    # the model's bytes with the measured union in place of the bound
    fetched = last["regions_fetched"]
    assert measured == 2 * fetched * per_region + (P - 1) * 2 * 16 * 8 * 4 + 8 * (P - 1) + 8 * fetched
    assert measured <= model
