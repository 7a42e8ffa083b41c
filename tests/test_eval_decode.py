"""ms_attention_decode: dense regime equals dense attention, sparse regime equals a loop oracle of the
decode rule, chunking and token-by-token decoding agree, and Lq == Lkv in the dense regime equals
ms_attention."""

from __future__ import annotations

import pytest
import torch

from ds_msattn.attention import ms_attention
from ds_msattn.attention.decode import dense_decode_reference, ms_attention_decode
from ds_msattn.attention.options import MSOptions
from ds_msattn.attention.reference import _moved, _rotate_plain, _unrotated


def decode_oracle(q, k, v, *, region_size, top_k, merge, sink_regions, scale=None, options=MSOptions(),
                  inv_freq=None, positions=None):
    """The decode rule of decode.py written with loops in float64 (options as in the prefill reference)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    c, m = region_size, merge
    scale = D**-0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    qs, ks = qd, kd
    if options.score == "position_free":
        qs, ks = _unrotated(qd, positions[:, Lkv - Lq :], inv_freq), _unrotated(kd, positions, inv_freq)
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
                    heads = range(g * G, (g + 1) * G) if options.per_kv_group else [h]
                    score = {j: sum(float(qs[bi, hh, i] @ ks[bi, g, j * c : (j + 1) * c].mean(0)) for hh in heads)
                             for j in rest}
                    chosen = sorted(list(range(sinks)) + sorted(rest, key=lambda j: (-score[j], j))[:n])
                start = blk * m * c
                far = [p for j in chosen for p in range(j * c, (j + 1) * c)]
                keys = far + list(range(start, t + 1))
                vectors = [
                    _rotate_plain(kd[bi, g, p], _moved(p, chosen.index(p // c), len(chosen), start, c,
                                                       options) - p, inv_freq) if options.moves_keys else kd[bi, g, p]
                    for p in far
                ] + [kd[bi, g, p] for p in range(start, t + 1)]
                s = (torch.stack(vectors) @ qd[bi, h, i]) * scale
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


OPTION_CASES = [
    pytest.param(dict(far_positions="compact"), id="compact"),
    pytest.param(dict(far_positions="capped", far_window=10), id="capped-W10"),
    pytest.param(dict(far_positions="grouped", far_window=6, far_group=3, score="position_free"), id="grouped+pf"),
    pytest.param(dict(score="position_free", select_per="kv_group"), id="pf+kv_group"),
    pytest.param(dict(far_positions="compact", score="position_free", select_per="kv_group"), id="all"),
]


@pytest.mark.parametrize("options", OPTION_CASES)
def test_decode_options_match_oracle(options):
    from test_attention_options import _rope, inv_freq

    B, Hq, Hkv, Lq, Lkv, D = 2, 4, 2, 9, 131, 16
    params = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lkv, D, seed=7)
    freqs = inv_freq(D)
    positions = (torch.arange(Lkv) + 5).expand(B, Lkv)
    q, k = _rope(q, positions[:, Lkv - Lq :], freqs), _rope(k, positions, freqs)
    got = ms_attention_decode(q, k, v, **params, **options, rope_inv_freq=freqs, position_ids=positions)
    want = decode_oracle(q, k, v, **params, options=MSOptions(**options), inv_freq=freqs, positions=positions)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    plain = ms_attention_decode(q, k, v, **params)
    assert not torch.allclose(got, plain, atol=1e-4)  # the option acted
