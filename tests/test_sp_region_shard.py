"""Region-sharded MS attention on 2 and 4 gloo processes equals single-process ``ms_attention``.

Outputs and dq, dk, dv are compared on every rank's shard; shapes are awkward on purpose (GQA, T not
a multiple of P*m*c so the last shard is padded with junk, sinks 0/1/2, short last region). Byte
counts are checked against closed forms for selections that are known in advance.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ds_msattn.parallel.spawn import run_ranks

# (B, Hq, Hkv, T, D, c, K, m, sinks)
CASES = [
    pytest.param((1, 4, 2, 203, 16, 4, 6, 2, 1), id="gqa-T203-c4-K6-m2-s1"),
    pytest.param((2, 3, 3, 157, 8, 8, 4, 1, 0), id="mha-B2-T157-c8-K4-m1-s0"),
    pytest.param((1, 6, 2, 300, 12, 5, 8, 3, 2), id="gqa3-T300-c5-K8-m3-s2"),
    pytest.param((1, 2, 1, 96, 8, 4, 32, 2, 1), id="dense-T96"),
]
# Options of docs/design.md on sharded sequences: (shape, options); positions wrapped as CRD-NTK wraps them.
OPTION_CASES = [
    ((1, 4, 2, 203, 16, 4, 6, 2, 1), dict(far_positions="compact", score="position_free", select_per="kv_group")),
    ((1, 6, 2, 300, 12, 5, 8, 3, 2), dict(far_positions="grouped", far_window=7, far_group=3)),
    ((2, 3, 3, 157, 8, 8, 4, 1, 0), dict(far_positions="capped", far_window=20, score="position_free")),
]


def _rotary(shape, options, Tp):
    """Keyword arguments that rotate: frequencies and wrapped global positions ``[Tp]`` (None without options)."""
    if not options:
        return {}, None
    D = shape[4]
    freqs = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D).float()
    return dict(options, rope_inv_freq=freqs), (torch.arange(Tp) + 91) % 128


def _inputs(shape, world, seed=0):
    B, Hq, Hkv, T, D, c, K, m, s = shape
    g = torch.Generator().manual_seed(seed)
    Tl = math.ceil(T / (world * m * c)) * m * c
    Tp = world * Tl
    # Junk in the padding: the result must not depend on it.
    q = torch.randn(B, Hq, Tp, D, generator=g)
    k = torch.randn(B, Hkv, Tp, D, generator=g)
    v = torch.randn(B, Hkv, Tp, D, generator=g)
    do = torch.randn(B, Hq, Tp, D, generator=g)
    return q, k, v, do, Tl


def _compare(rank, world, cases):
    from ds_msattn.attention import ms_attention
    from ds_msattn.parallel.region_shard import TrafficStats, region_sharded_attention

    errors = []
    for shape, options in cases:
        B, Hq, Hkv, T, D, c, K, m, s = shape
        q, k, v, do, Tl = _inputs(shape, world)
        extra, pos = _rotary(shape, options, world * Tl)
        params = dict(region_size=c, top_k=K, merge=m, sink_regions=s, **extra)
        # single-process result on the unpadded sequence
        qr, kr, vr = (x[:, :, :T].clone().requires_grad_() for x in (q, k, v))
        ref = ms_attention(qr, kr, vr, **params, backend="torch", **({} if pos is None else {"position_ids": pos[:T]}))
        ref.backward(do[:, :, :T])
        # this rank's shard
        lo, hi = rank * Tl, (rank + 1) * Tl
        ql, kl, vl = (x[:, :, lo:hi].clone().requires_grad_() for x in (q, k, v))
        stats = TrafficStats()
        shard_pos = {} if pos is None else {"position_ids": pos[lo:hi]}
        out = region_sharded_attention(ql, kl, vl, **params, valid_len=T, stats=stats, **shard_pos)
        n = max(0, min(hi, T) - lo)
        dol = do[:, :, lo:hi].clone()
        dol[:, :, n:] = 0  # padding tokens carry no loss
        out.backward(dol)
        errs = {
            "out": (out[:, :, :n] - ref[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
            "dq": (ql.grad[:, :, :n] - qr.grad[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
            "dk": (kl.grad[:, :, :n] - kr.grad[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
            "dv": (vl.grad[:, :, :n] - vr.grad[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
        }
        errors.append(((shape, options), errs, stats.totals()))
    return errors


def _bytes(rank, world, shape):
    from ds_msattn.parallel.region_shard import TrafficStats, region_sharded_attention

    q, k, v, do, Tl = _inputs(shape, world, seed=1)
    B, Hq, Hkv, T, D, c, K, m, s = shape
    lo, hi = rank * Tl, (rank + 1) * Tl
    ql, kl, vl = (x[:, :, lo:hi].clone().requires_grad_() for x in (q, k, v))
    stats = TrafficStats()
    out = region_sharded_attention(ql, kl, vl, region_size=c, top_k=K, merge=m, sink_regions=s, valid_len=T, stats=stats)
    out.backward(do[:, :, lo:hi])
    return stats.totals()


BYTE_SHAPES = {
    # (B, Hq, Hkv, Tl, D, c, K, m): every history fits, so rank r fetches every region of ranks < r
    "dense": (2, 4, 2, 16, 8, 4, 64, 2),
    # one history slot, taken by the sink: every rank r > 0 fetches region 0 only
    "sink-only": (2, 4, 2, 16, 8, 4, 2, 1),
}


ULYSSES_SHAPE = (1, 8, 4, 203, 16, 4, 6, 2, 1)  # GQA, heads divisible by 2 and 4, T padded
ULYSSES_OPTIONS = dict(far_positions="compact", score="position_free", select_per="kv_group")


def _ulysses(rank, world, shape, options=None):
    """DeepSpeed-Ulysses (DistributedAttention) with ms_attention locally vs single-process ms_attention."""
    import torch.distributed as dist

    from ds_msattn.attention import ms_attention
    from ds_msattn.parallel.ulysses import UlyssesMSAttention

    B, Hq, Hkv, T, D, c, K, m, s = shape
    q, k, v, do, Tl = _inputs(shape, world, seed=2)
    extra, pos = _rotary(shape, options, world * Tl)
    params = dict(region_size=c, top_k=K, merge=m, sink_regions=s, **extra)
    qr, kr, vr = (x[:, :, :T].clone().requires_grad_() for x in (q, k, v))
    ref = ms_attention(qr, kr, vr, **params, **({} if pos is None else {"position_ids": pos[:T]}))
    ref.backward(do[:, :, :T])
    lo, hi = rank * Tl, (rank + 1) * Tl
    ql, kl, vl = (x[:, :, lo:hi].clone().requires_grad_() for x in (q, k, v))
    attn = UlyssesMSAttention(dist.group.WORLD)
    shard_pos = {} if pos is None else {"position_ids": pos[lo:hi]}
    out = attn(ql, kl, vl, dict(params, scale=None, **shard_pos), T)
    n = max(0, min(hi, T) - lo)
    dol = do[:, :, lo:hi].clone()
    dol[:, :, n:] = 0
    out.backward(dol)
    return {
        "out": (out[:, :, :n] - ref[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
        "dq": (ql.grad[:, :, :n] - qr.grad[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
        "dk": (kl.grad[:, :, :n] - kr.grad[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
        "dv": (vl.grad[:, :, :n] - vr.grad[:, :, lo : lo + n]).abs().max().item() if n else 0.0,
        "bytes": attn.bytes_sent[0],
    }


def _all(rank, world):
    """Everything one group of processes checks (process start-up dominates the cost: start once)."""
    cases = [(p.values[0], None) for p in CASES] + OPTION_CASES
    out = {
        "compare": _compare(rank, world, cases),
        "ulysses": _ulysses(rank, world, ULYSSES_SHAPE),
        "ulysses_options": _ulysses(rank, world, ULYSSES_SHAPE, ULYSSES_OPTIONS),
    }
    for mode, (B, Hq, Hkv, Tl, D, c, K, m) in BYTE_SHAPES.items():
        out[mode] = _bytes(rank, world, (B, Hq, Hkv, world * Tl, D, c, K, m, 1))
    return out


@functools.cache
def _results(world):
    return run_ranks(_all, world)


@pytest.mark.parametrize("world", [2, 4])
def test_region_shard_equals_single_process(world):
    results = [r["compare"] for r in _results(world)]
    worst = {}
    for rank, per_rank in enumerate(results):
        for shape, errs, totals in per_rank:
            for name, err in errs.items():
                worst[name] = max(worst.get(name, 0.0), err)
                assert err < 2e-5, f"P={world} rank {rank} case {shape}: {name} differs by {err}"
            # the forward and backward exchanges are mirror images
            assert totals["grad_sent"] == totals["kv_recv"] and totals["grad_recv"] == totals["kv_sent"]
    print(f"P={world} worst abs errors: {worst}")
    # every rank's sends are some other rank's receipts
    sent = sum(t["kv_sent"] for per_rank in results for _, _, t in per_rank)
    recv = sum(t["kv_recv"] for per_rank in results for _, _, t in per_rank)
    assert sent == recv and recv > 0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["dense", "sink-only"])
def test_region_shard_bytes_match_closed_form(world, mode):
    B, Hq, Hkv, Tl, D, c, K, m = BYTE_SHAPES[mode]
    results = [r[mode] for r in _results(world)]
    Rl = Tl // c
    region_bytes = c * 2 * D * 4  # one region of k and v, fp32
    for r, totals in enumerate(results):
        if mode == "dense":
            recv_regions = B * Hkv * r * Rl
            sent_regions = B * Hkv * Rl * (world - 1 - r)
        else:
            recv_regions = B * Hkv * (1 if r > 0 else 0)
            sent_regions = B * Hkv * (world - 1) if r == 0 else 0
        assert totals["regions_fetched"] == recv_regions
        assert totals["kv_recv"] == recv_regions * region_bytes, (r, totals)
        assert totals["kv_sent"] == sent_regions * region_bytes, (r, totals)
        assert totals["grad_sent"] == recv_regions * region_bytes
        assert totals["grad_recv"] == sent_regions * region_bytes
        assert totals["meta_sent"] == 8 * (world - 1) + 8 * recv_regions
        assert totals["kbar"] == (world - 1) * B * Hkv * Rl * D * 4


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_equals_single_process(world):
    B, Hq, Hkv, T, D, c, K, m, s = ULYSSES_SHAPE
    Tl = math.ceil(T / (world * m * c)) * m * c
    results = [r["ulysses"] for r in _results(world)]
    print(f"P={world} Ulysses worst abs errors:", {n: max(res[n] for res in results) for n in ("out", "dq", "dk", "dv")})
    for rank, res in enumerate(results):
        for name in ("out", "dq", "dk", "dv"):
            assert res[name] < 2e-5, f"P={world} rank {rank}: {name} differs by {res[name]}"
            with_options = _results(world)[rank]["ulysses_options"][name]
            assert with_options < 2e-5, f"P={world} rank {rank} with {ULYSSES_OPTIONS}: {name} differs by {with_options}"
        # all-to-all of q, k, v, o: (P-1)/P of each local tensor leaves the rank
        assert res["bytes"] == (2 * Hq + 2 * Hkv) * B * Tl * D * 4 * (world - 1) // world


def test_ulysses_rejects_head_counts_not_divisible():
    from ds_msattn.parallel.ulysses import check_heads

    check_heads(8, 4, 4)
    with pytest.raises(ValueError, match="sequence_parallel_size \\(2\\) to divide the number of attention heads \\(9\\)"):
        check_heads(9, 3, 2)
    with pytest.raises(ValueError, match="key/value heads \\(2\\)"):
        check_heads(8, 2, 4)
