"""ms_attention_decode: dense regime equals dense attention, sparse regime equals a loop oracle of the
decode rule, chunking and token-by-token decoding agree, and Lq == Lkv in the dense regime equals
ms_attention."""

from __future__ import annotations

import pytest
import torch

from ds_msattn.attention import ms_attention
from ds_msattn.attention.decode import dense_decode_reference, ms_attention_decode


def decode_oracle(q, k, v, *, region_size, top_k, merge, sink_regions, scale=None):
    """The decode rule of decode.py written with loops in float64."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    c, m = region_size, merge
    scale = D**-0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Lq):
                t = Lkv - Lq + i
                blk = t // (m * c)
                hist = list(range(blk * m))
                if len(hist) <= top_k - m:
                    chosen = hist
                else:
                    sinks = min(sink_regions, top_k - m)
                    n = top_k - m - sinks
                    rest = hist[sinks:]
                    score = {j: float(qd[bi, h, i] @ kd[bi, g, j * c : (j + 1) * c].mean(0)) for j in rest}
                    chosen = list(range(sinks)) + sorted(rest, key=lambda j: (-score[j], j))[:n]
                keys = [p for j in chosen for p in range(j * c, (j + 1) * c)] + list(range(blk * m * c, t + 1))
                s = (kd[bi, g, keys] @ qd[bi, h, i]) * scale
                out[bi, h, i] = torch.softmax(s, 0) @ vd[bi, g, keys]
    return out.to(q.dtype)


def _qkv(B, Hq, Hkv, Lq, Lkv, D, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lkv, D, generator=g)
    v = torch.randn(B, Hkv, Lkv, Dv or D, generator=g)
    return q, k, v


CASES = [
    pytest.param(1, 2, 1, 1, 1, 8, dict(region_size=4, top_k=4, merge=2, sink_regions=1), id="T1"),
    pytest.param(3, 4, 2, 1, 63, 16, dict(region_size=4, top_k=6, merge=2, sink_regions=1), id="B3-gqa-one-token"),
    pytest.param(2, 3, 3, 5, 111, 60, dict(region_size=5, top_k=5, merge=1, sink_regions=0), id="D60-no-sink"),
    pytest.param(1, 6, 2, 17, 150, 8, dict(region_size=4, top_k=8, merge=3, sink_regions=2), id="chunk17-sinks2"),
    pytest.param(2, 2, 1, 40, 97, 12, dict(region_size=3, top_k=4, merge=4, sink_regions=1), id="m=K-local-only"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lkv,D,params", CASES)
def test_decode_matches_oracle(B, Hq, Hkv, Lq, Lkv, D, params):
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lkv, D, Dv=D + 3)
    got = ms_attention_decode(q, k, v, **params)
    want = decode_oracle(q, k, v, **params)
    assert got.shape == (B, Hq, Lq, D + 3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("Lq,Lkv", [(1, 1), (1, 77), (9, 64), (64, 64)])
def test_dense_regime_equals_dense_attention(Lq, Lkv):
    params = dict(region_size=8, top_k=11, merge=2)  # K*c = 88 >= Lkv: every history fits
    q, k, v = _qkv(2, 4, 2, Lq, Lkv, 16, seed=3)
    torch.testing.assert_close(ms_attention_decode(q, k, v, **params), dense_decode_reference(q, k, v), atol=2e-5, rtol=2e-5)


def test_full_length_dense_regime_equals_ms_attention():
    params = dict(region_size=4, top_k=10, merge=2, sink_regions=1)
    q, k, v = _qkv(1, 4, 2, 37, 37, 16, seed=4)
    torch.testing.assert_close(ms_attention_decode(q, k, v, **params), ms_attention(q, k, v, **params), atol=2e-5, rtol=2e-5)


def test_token_by_token_equals_one_call():
    """The rule is per token: decoding one token at a time gives the outputs of one call."""
    params = dict(region_size=4, top_k=5, merge=2, sink_regions=1)
    q, k, v = _qkv(2, 4, 2, 120, 120, 8, seed=5)
    whole = ms_attention_decode(q, k, v, **params)
    steps = [ms_attention_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], **params) for t in range(120)]
    torch.testing.assert_close(torch.cat(steps, dim=2), whole, atol=1e-5, rtol=1e-5)


def test_chunked_queries_equal_one_chunk(monkeypatch):
    import ds_msattn.attention.decode as dec

    params = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    q, k, v = _qkv(1, 2, 1, 50, 90, 8, seed=6)
    whole = ms_attention_decode(q, k, v, **params)
    monkeypatch.setattr(dec, "CHUNK_BUDGET", 1)  # one query per chunk
    torch.testing.assert_close(ms_attention_decode(q, k, v, **params), whole)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(region_size=0, top_k=4, merge=1), "region_size"), (dict(region_size=4, top_k=2, merge=3), "merge")],
)
def test_bad_params(kwargs, match):
    q, k, v = _qkv(1, 2, 1, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        ms_attention_decode(q, k, v, **kwargs)


def test_bad_lengths():
    q, k, v = _qkv(1, 2, 1, 9, 8, 8)
    with pytest.raises(ValueError, match="Lq"):
        ms_attention_decode(q, k, v, region_size=4, top_k=4, merge=1)
