"""The options of docs/design.md, "Options of MS attention beyond the paper": the fast torch path (outputs and
dq, dk, dv) and the vectorised selection against the float64 reference, on awkward shapes."""

import math

import pytest
import torch

from ds_msattn import ms_attention
from ds_msattn.attention import reference_selection, select_regions
from ds_msattn.attention.options import MSOptions, key_shifts, rotate, unrotate

# (B, Hq, Hkv, T, D, c, K, m, s)
SHAPES = {
    "gqa2-T111": (2, 4, 2, 111, 16, 4, 6, 2, 1),
    "mqa4-T150-m1": (1, 4, 1, 150, 12, 4, 5, 1, 0),
    "D60-T97-sink2": (1, 2, 2, 97, 60, 8, 5, 1, 2),
    "gqa3-m3": (1, 6, 2, 140, 16, 4, 8, 3, 1),
}
# option sets: (name, kwargs)
OPTIONS = {
    "compact": dict(far_positions="compact"),
    "capped-W12": dict(far_positions="capped", far_window=12),
    "grouped-W8-G3": dict(far_positions="grouped", far_window=8, far_group=3),
    "position_free": dict(score="position_free"),
    "kv_group": dict(select_per="kv_group"),
    "compact+position_free+kv_group": dict(far_positions="compact", score="position_free", select_per="kv_group"),
    "grouped-W0+position_free": dict(far_positions="grouped", far_window=0, far_group=2, score="position_free"),
}
CASES = [
    pytest.param(shape, opt, id=f"{shape}-{opt}")
    for shape, opt in [
        ("gqa2-T111", "compact"), ("gqa2-T111", "capped-W12"), ("gqa2-T111", "grouped-W8-G3"),
        ("gqa2-T111", "position_free"), ("gqa2-T111", "kv_group"), ("mqa4-T150-m1", "compact+position_free+kv_group"),
        ("mqa4-T150-m1", "capped-W12"), ("D60-T97-sink2", "grouped-W0+position_free"), ("D60-T97-sink2", "compact"),
        ("gqa3-m3", "compact+position_free+kv_group"), ("gqa3-m3", "kv_group"),
    ]
]


def inv_freq(D, base=10000.0):
    return 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D).float()


def _rope(x, positions, freqs):
    """Rotate ``x [B, H, T, D]`` at ``positions [B, T]`` the way transformers' Llama does (fp32 angles)."""
    angle = positions.float()[:, None, :, None] * freqs.float()
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _inputs(B, Hq, Hkv, T, D, positions=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(T).expand(B, T) if positions is None else positions
    freqs = inv_freq(D)
    q = _rope(torch.randn(B, Hq, T, D, generator=g), positions, freqs)
    k = _rope(torch.randn(B, Hkv, T, D, generator=g), positions, freqs)
    v = torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v, freqs, positions


def _run(q, k, v, do, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = ms_attention(q, k, v, **kw)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _lists(sel):
    return [[[[j for j in row if j >= 0] for row in head] for head in batch] for batch in sel.tolist()]


@pytest.mark.parametrize("shape,opt", CASES)
def test_options_match_reference(shape, opt):
    B, Hq, Hkv, T, D, c, K, m, s = SHAPES[shape]
    wrapped = torch.remainder(torch.arange(T) + 37, 64).expand(B, T)  # CRD-NTK: shifted, wrapped positions
    q, k, v, freqs, pos = _inputs(B, Hq, Hkv, T, D, positions=wrapped)
    kw = dict(region_size=c, top_k=K, merge=m, sink_regions=s, rope_inv_freq=freqs, position_ids=pos, **OPTIONS[opt])
    options = MSOptions(**{key: kw[key] for key in OPTIONS[opt]})
    sel = select_regions(q, k, region_size=c, top_k=K, merge=m, sink_regions=s, options=options,
                         rope_inv_freq=freqs, positions=pos)
    ref_sel = reference_selection(q, k, region_size=c, top_k=K, merge=m, sink_regions=s, options=options,
                                  rope_inv_freq=freqs, positions=pos)
    assert _lists(sel) == ref_sel
    do = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(1))
    ref = _run(q, k, v, do, backend="reference", **kw)
    fast = _run(q, k, v, do, backend="torch", **kw)
    for name, a, b in zip(("o", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=lambda text, name=name: f"{name}: {text}")


def test_options_change_the_result():
    """Each option really acts in the sparse regime (guards against a silently ignored keyword)."""
    q, k, v, freqs, _ = _inputs(1, 4, 2, 160, 16)
    base = dict(region_size=4, top_k=6, merge=2, sink_regions=1, rope_inv_freq=freqs, backend="torch")
    plain = ms_attention(q, k, v, **base)
    for opt in ("compact", "capped-W12", "grouped-W8-G3", "position_free", "kv_group"):
        assert not torch.allclose(ms_attention(q, k, v, **base, **OPTIONS[opt]), plain, atol=1e-4), opt


@pytest.mark.parametrize("opt", ["compact", "capped-W12"])
def test_autograd_does_not_keep_a_rotation_table_per_layer(opt):
    """The torch path's mover lives in the autograd context until backward: its cos/sin tables ([2T+1, D/2] each,
    8 MiB per layer at 16K) must be gone by then, or every layer of a training step keeps one."""
    q, k, v, freqs, _ = _inputs(1, 4, 2, 160, 16)
    q.requires_grad_()
    o = ms_attention(q, k, v, region_size=4, top_k=6, merge=2, sink_regions=1, rope_inv_freq=freqs, backend="torch",
                     **OPTIONS[opt])
    nodes, movers = [o.grad_fn], []
    while nodes:
        node = nodes.pop()
        if node is not None:
            movers += [p for p in getattr(node, "params", ()) if hasattr(p, "release")]
            nodes += [n for n, _ in node.next_functions]
    assert len(movers) == 1 and "_tables" not in movers[0].__dict__
    o.sum().backward()
    assert "_tables" not in movers[0].__dict__


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_capped_with_a_window_past_the_input_is_exact(backend):
    q, k, v, freqs, _ = _inputs(2, 4, 2, 111, 16)
    kw = dict(region_size=4, top_k=6, merge=2, backend=backend)
    exact = ms_attention(q, k, v, **kw)
    torch.testing.assert_close(ms_attention(q, k, v, **kw, far_positions="capped", far_window=111, rope_inv_freq=freqs), exact)
    torch.testing.assert_close(ms_attention(q, k, v, **kw, far_positions="grouped", far_window=111, far_group=3,
                                            rope_inv_freq=freqs), exact)


def test_compact_in_the_dense_regime_is_dense():
    """With every history selected, compact lays the regions where they are: dense causal attention."""
    q, k, v, freqs, _ = _inputs(1, 2, 2, 70, 16)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = ms_attention(q, k, v, region_size=4, top_k=64, merge=2, far_positions="compact", rope_inv_freq=freqs,
                       score="position_free", backend="torch")
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_compact_distances_stay_below_K_times_c():
    c, m, K = 4, 2, 6
    sel = torch.tensor([[[[0, 3, 9, 17], [0, 1, -1, -1]]]])  # [1, 1, nb=2, S=4]
    blocks = torch.tensor([12, 1])
    shift = key_shifts(sel, blocks, region_size=c, merge=m, options=MSOptions(far_positions="compact"))
    p = sel.clamp(min=0)[..., None] * c + torch.arange(c)
    moved = p + shift
    starts = blocks * m * c
    # block 12: regions laid out just before its start, in order
    assert moved[0, 0, 0].flatten().tolist() == list(range(starts[0] - 16, starts[0]))
    # block 1 selected its whole history (2 regions): compact leaves them where they are
    assert moved[0, 0, 1, :2].flatten().tolist() == list(range(0, 8))
    assert shift[0, 0, 1, 2:].flatten().tolist() == [0] * 2 * c
    assert int((starts[0] + m * c - 1) - moved[0, 0, 0].min()) < K * c


@pytest.mark.parametrize("far", ["exact", "compact", "capped", "grouped"])
def test_per_region_shifts_broadcast_to_the_per_key_shifts(far):
    c, m = 4, 2
    sel = torch.tensor([[[[0, 3, 9, 17], [0, 1, -1, -1], [2, 5, 40, -1]]]])  # [1, 1, nb=3, S=4]
    blocks = torch.tensor([12, 1, 30])
    opts = MSOptions(far_positions=far, far_window=24, far_group=3)
    per_key = key_shifts(sel, blocks, region_size=c, merge=m, options=opts)
    per_region = key_shifts(sel, blocks, region_size=c, merge=m, options=opts, per_region=True)
    assert per_region.shape[-1] == (1 if far in ("exact", "compact") else c)
    assert torch.equal(per_region.expand_as(per_key), per_key)


def test_grouped_and_capped_positions_follow_the_definition():
    start = torch.tensor(100)
    p = torch.arange(0, 100)
    from ds_msattn.attention.options import moved_index

    capped = moved_index(p, start, MSOptions(far_positions="capped", far_window=30))
    assert capped.tolist() == [70] * 70 + list(range(70, 100))
    grouped = moved_index(p, start, MSOptions(far_positions="grouped", far_window=30, far_group=4))
    assert grouped.tolist() == [70 - math.ceil((70 - x) / 4) if x < 70 else x for x in range(100)]


def test_rotate_moves_a_rope_key_and_unrotate_undoes_it():
    freqs = inv_freq(16)
    x = torch.randn(1, 1, 50, 16, dtype=torch.float64)
    pos = torch.arange(50)[None] * 7 + 3
    rotated = _rope(x, pos, freqs)
    torch.testing.assert_close(unrotate(rotated, pos, freqs).double(), x, atol=1e-5, rtol=1e-5)
    moved = rotate(rotated, torch.full((1, 1, 50), -3), freqs)
    torch.testing.assert_close(moved, _rope(x, pos - 3, freqs), atol=3e-5, rtol=1e-5)  # _rope: fp32 angles


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(far_positions="near"), "far_positions"),
        (dict(score="cosine"), "score"),
        (dict(select_per="batch"), "select_per"),
        (dict(far_positions="capped", far_window=-1), "far_window"),
        (dict(far_positions="grouped", far_group=0), "far_group"),
        (dict(far_positions="compact"), "rope_inv_freq"),
        (dict(score="position_free", rope_inv_freq=torch.ones(3)), "rope_inv_freq"),
        (dict(score="position_free", rope_inv_freq=torch.ones(8), position_ids=torch.arange(5)), "position_ids"),
        (dict(score="position_free", rope_inv_freq=torch.ones(8), position_ids=torch.ones(40)), "position_ids"),
    ],
)
def test_bad_options_name_the_key(kw, match):
    q, k, v, _, _ = _inputs(1, 2, 2, 40, 16)
    with pytest.raises(ValueError, match=match):
        ms_attention(q, k, v, region_size=4, top_k=4, merge=2, **kw)
