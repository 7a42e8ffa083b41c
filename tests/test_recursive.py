"""Streaming mode (region store + selection over summaries): equals ms_attention (with every option) /
ms_attention_decode while the window holds the whole history or the summary search keeps every candidate,
keeps every region exact in the store (on disk or not, same results) with a bounded in-memory state,
and the model-level runner equals the transformers model under attn_implementation="ms_attention"."""

from __future__ import annotations

import os

import pytest
import torch

import ds_msattn  # noqa: F401  (registers ms_attention with transformers)
from ds_msattn.attention import ms_attention
from ds_msattn.attention.decode import ms_attention_decode
from ds_msattn.eval.recursive import LayerState, RecursiveConfig, RecursiveRunner


def _qkv(B, Hq, Hkv, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


PARAMS = [
    pytest.param(dict(region_size=4, top_k=6, merge=2, sink_regions=1), 24, id="c4-K6-m2-s1"),
    pytest.param(dict(region_size=3, top_k=5, merge=1, sink_regions=0), 9, id="c3-K5-m1-nosink"),
    pytest.param(dict(region_size=4, top_k=8, merge=3, sink_regions=2), 12, id="c4-K8-m3-s2"),
]


INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
PAPER = dict(far_positions="exact", score="rope", select_per="head")  # RecursiveConfig defaults to the model's options
OPTIONS = [
    pytest.param({}, id="paper"),
    pytest.param(dict(far_positions="compact", score="position_free"), id="compact-free"),
    pytest.param(dict(far_positions="capped", far_window=10, select_per="kv_group"), id="capped-kvgroup"),
    pytest.param(dict(far_positions="grouped", far_window=8, far_group=3, score="position_free", select_per="kv_group"),
                 id="grouped-free-kvgroup"),
]
# Ways for every history region to stay a candidate: a window that holds it all, no coarse levels, or a beam
# through the summary levels that keeps every group (the coarse-to-fine path, with far regions in the store).
EVERYTHING = [
    pytest.param(dict(window_regions=1000), id="window"),
    pytest.param(dict(window_regions=8, scales=(1,)), id="fine-only"),
    pytest.param(dict(window_regions=8, scales=(1, 2, 4), beam=100), id="wide-beam"),
    pytest.param(dict(window_regions=8, scales=(1, 2, 4), beam=100, coarse_score="bound"), id="wide-beam-bound"),
]


def _stream(cfg, q, k, v, chunk, **kw):
    state = LayerState(cfg, scale=q.shape[-1] ** -0.5, **kw)
    outs = [state.prefill(q[:, :, a : a + chunk], k[:, :, a : a + chunk], v[:, :, a : a + chunk])
            for a in range(0, q.shape[2], chunk)]
    return torch.cat(outs, 2), state


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("params,chunk,everything", [
    pytest.param(*p.values, EVERYTHING[0].values[0], id=f"{p.id}-window") for p in PARAMS
] + [pytest.param(*PARAMS[2].values, e.values[0], id=f"{PARAMS[2].id}-{e.id}") for e in EVERYTHING[1:]])
def test_prefill_equals_ms_attention_when_every_region_is_a_candidate(params, chunk, everything, options):
    q, k, v = _qkv(2, 4, 2, 150, 8)
    cfg = RecursiveConfig(**params, chunk=chunk, **everything, **{**PAPER, **options}, store_memory_gib=0,
                          store_segment_mib=0.002)
    got, state = _stream(cfg, q, k, v, chunk, inv_freq=INV_FREQ)
    want = ms_attention(q, k, v, **params, **options, rope_inv_freq=INV_FREQ)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert state.store.disk_bytes > 0 and state.store.ram_bytes == 0  # read back from the store's files


@pytest.mark.parametrize("params,chunk,options", [
    pytest.param(*p.values, {}, id=f"{p.id}-paper") for p in PARAMS
] + [pytest.param(*PARAMS[2].values, o.values[0], id=f"{PARAMS[2].id}-{o.id}") for o in (OPTIONS[1], OPTIONS[3])])
def test_decode_equals_ms_attention_decode(params, chunk, options):
    q, k, v = _qkv(1, 4, 2, 130, 8, seed=1)
    prompt = 37  # not block aligned: the last block is left pending
    cfg = RecursiveConfig(**params, chunk=chunk, window_regions=1000, **{**PAPER, **options})
    state = LayerState(cfg, scale=8**-0.5, inv_freq=INV_FREQ)
    pre = state.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    want = ms_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], **params, **options, rope_inv_freq=INV_FREQ)
    torch.testing.assert_close(pre, want, atol=2e-5, rtol=2e-5)
    for t in range(prompt, 130):
        got = state.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        want = ms_attention_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], **params, **options,
                                   rope_inv_freq=INV_FREQ)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"token {t}: {m}")


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[1]])
def test_store_is_exact_state_bounded_and_disk_changes_nothing(options):
    """480 tokens through a small window and beam: the store on disk gives the in-memory run's outputs
    bit for bit, holds every region's k and v exactly, its summaries are the means of their regions, and the
    in-memory state (the pending block) stays bounded."""
    c, m = 4, 2
    base = dict(region_size=c, top_k=6, merge=m, sink_regions=1, chunk=16, window_regions=4, scales=(1, 2, 8), beam=2,
                coarse_score="mean", **{**PAPER, **options})
    T = 480
    q, k, v = _qkv(1, 2, 1, T, 8, seed=2)
    ram, s_ram = _stream(RecursiveConfig(**base, store_memory_gib=1), q, k, v, 16, inv_freq=INV_FREQ)
    disk, s_disk = _stream(RecursiveConfig(**base, store_memory_gib=0, store_segment_mib=0.003), q, k, v, 16,
                           inv_freq=INV_FREQ)
    assert torch.isfinite(ram).all()
    assert torch.equal(ram, disk)
    assert s_ram.store.disk_bytes == 0 and s_disk.store.ram_bytes == 0 and len(s_disk.store["k"].segments) > 3
    store = s_disk.store
    R = T // c
    ids = torch.arange(R)
    torch.testing.assert_close(store["k"].read(0, ids)[:, 0, 0], k[0, 0].view(R, c, 8), atol=0, rtol=0)
    torch.testing.assert_close(store["v"].read(0, ids)[:, 0, 0], v[0, 0].view(R, c, 8), atol=0, rtol=0)
    fine = store["kbar0"].read(0, ids)
    for lvl, s in enumerate(base["scales"][1:], start=1):
        coarse = store[f"kbar{lvl}"].read(0, torch.arange(R // s))
        torch.testing.assert_close(coarse, fine[: R // s * s].view(R // s, s, 1, 1, 8).mean(1), atol=1e-6, rtol=1e-6)
    assert s_disk.state_elements() == 0  # block-aligned input: nothing besides the store
    # The search reads far regions: the output differs from one where every region is a candidate.
    everything, _ = _stream(RecursiveConfig(**{**base, "window_regions": 10**4}), q, k, v, 16, inv_freq=INV_FREQ)
    assert not torch.allclose(ram, everything)


def test_bound_envelopes_bound_every_region_and_find_a_lone_match():
    """coarse_score="bound": a coarse group stores the elementwise max and min of its regions' summaries, its score
    is never below any of its regions' scores, and a lone matching far region (one strong key among 2047 random
    ones), which a group's mean averages away, is still found through a beam of one group."""
    c, s_top, T, D = 4, 16, 2048, 8
    base = dict(region_size=c, top_k=4, merge=1, sink_regions=0, chunk=64, window_regions=3, scales=(1, s_top),
                beam=1, **PAPER, store_memory_gib=1)
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g), 0.1 * torch.randn(1, 1, T, D, generator=g)
    needle = 40 * c + 1  # a token of region 40 (group 2 of 32)
    k[0, 0, needle] = 10 * torch.eye(D)[0]
    v[0, 0, needle] = 100 * torch.eye(D)[1]
    q[0, 0, T - c :] = 3 * torch.eye(D)[0]  # the last block asks for direction 0
    out = {}
    for coarse in ("mean", "bound"):
        got, state = _stream(RecursiveConfig(**base, coarse_score=coarse), q, k, v, 64)
        out[coarse] = got[0, 0, T - c :, 1]
    kbar = state.store["kbar0"].read(0, torch.arange(T // c))[:, 0, 0]  # [R, D]
    env = state.store["kbar1"].read(0, torch.arange(T // c // s_top))[:, 0, 0]  # [G, 2, D]
    fine = kbar.view(-1, s_top, D)
    torch.testing.assert_close(env[:, 0], fine.amax(1), atol=0, rtol=0)
    torch.testing.assert_close(env[:, 1], fine.amin(1), atol=0, rtol=0)
    probe = torch.randn(64, D, generator=g)
    bound = probe.clamp(min=0) @ env[:, 0].T + probe.clamp(max=0) @ env[:, 1].T  # [64, G]
    assert (bound[:, :, None] >= torch.einsum("pd,grd->pgr", probe, fine) - 1e-5).all()
    # The answer block reads the needle's value (weight ~1 on it) only when the search keeps its group.
    assert (out["bound"] > 50).all(), out["bound"]
    assert (out["mean"].abs() < 5).all(), out["mean"]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_store_reads_leave_no_page_resident(tmp_path):
    """Streaming through a store on disk: right after every read (k, v, summaries) no page of the store's files is
    resident in this process, so the resident set does not grow with the regions a chunk reads, i.e. with the
    history (memory-mapped reads kept each chunk's pages resident until its end); the output is unchanged."""
    from test_stream_store import _resident_kib

    from ds_msattn.eval.recursive import make_store

    base = dict(region_size=4, top_k=6, merge=2, sink_regions=1, chunk=16, window_regions=4, scales=(1, 2, 8), beam=2,
                **PAPER)
    q, k, v = _qkv(1, 2, 1, 480, 8, seed=2)
    cfg = RecursiveConfig(**base, store_memory_gib=0, store_segment_mib=0.003, store_dir=str(tmp_path))
    store = make_store(cfg, layers=1, batch=1, kv_heads=1, head_dim=8, value_dim=8, dtype=torch.float32)
    resident, reads = [], []
    for name, arr in store.arrays.items():
        def read(layer, ids, _read=arr.read):
            out = _read(layer, ids)
            reads.append(len(ids))
            resident.append(_resident_kib(store.dir))
            return out
        arr.read = read
    got, _ = _stream(cfg, q, k, v, 16, inv_freq=INV_FREQ, store=store)
    want, _ = _stream(RecursiveConfig(**base, store_memory_gib=1), q, k, v, 16, inv_freq=INV_FREQ)
    assert torch.equal(got, want) and store.disk_bytes > 0 and sum(reads) > 1000
    assert max(resident) == 0


def test_bad_config():
    with pytest.raises(ValueError, match="chunk"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=12)
    with pytest.raises(ValueError, match="coarse_score"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, coarse_score="max")
    with pytest.raises(ValueError, match="window_regions"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, window_regions=3)
    with pytest.raises(ValueError, match="scales"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, scales=(2, 3))
    with pytest.raises(ValueError, match="scales"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, scales=(1, 3, 4))
    with pytest.raises(ValueError, match="local_regions"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, local_regions=4)
    with pytest.raises(ValueError, match="far_positions"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, far_positions="near")
    with pytest.raises(ValueError, match="store dtype"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, store_dtype="int8")
    with pytest.raises(ValueError, match="inv_freq"):
        LayerState(RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, score="position_free"), scale=1.0)


def _tiny_models(params, family="llama"):
    from transformers import AutoModelForCausalLM

    from ds_msattn.models import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(family)
    cfg.ms_attention = dict(params)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ms_attention").eval()
    if family == "qwen2":  # non-zero q/k/v biases, so the runner must apply them
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_runner_equals_transformers_ms_attention(family):
    params = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    model = _tiny_models(params, family)
    ids = torch.randint(0, 256, (1, 203), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits[0]
    runner = RecursiveRunner(model, RecursiveConfig(**params, chunk=32, window_regions=1000))
    hidden = torch.cat([runner.prefill(ids[:, a : a + 32]) for a in range(0, 203, 32)], 1)[0]
    got = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # NLL of the chunked run equals the full model's.
    res = runner.run(ids[0], new_tokens=6, log=None)
    nll = torch.nn.functional.cross_entropy(want[:-1], ids[0, 1:])
    assert res["nll_per_token"] == pytest.approx(float(nll), rel=1e-5)
    # Greedy continuation equals the transformers model decoding with a KV cache (ms_attention_decode).
    from ds_msattn.eval.passkey import greedy_generate

    assert res["new_tokens"] == greedy_generate(model, ids[0], 6)


def test_runner_rejects_dynamic_rope():
    model = _tiny_models(dict(region_size=4, top_k=6, merge=2))
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="dynamic"):
        RecursiveRunner(model, RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8))


def test_runner_store_on_disk_equals_in_memory_run():
    """Tiny model, 600 tokens through a 4-region window and a narrow beam with compact positions and
    position-free scores: forcing the store onto disk (fp16) changes no logit and no generated
    token; per-segment NLL adds up to the whole."""
    params = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    model = _tiny_models(params)
    ids = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(4))
    base = dict(**params, chunk=32, window_regions=4, scales=(1, 2, 8), beam=2, far_positions="compact",
                score="position_free", local_regions=1)
    for dtype in ("float16",):  # fp32 is covered by the LayerState test above
        res = []
        for memory in (1.0, 0.0):
            runner = RecursiveRunner(model, RecursiveConfig(**base, store_dtype=dtype, store_memory_gib=memory,
                                                            store_segment_mib=0.01))
            done = []
            res.append(runner.run(ids, new_tokens=5, log=None, segment_tokens=256, on_segment=done.append))
            assert done == res[-1]["segments"][:2]  # reported as each completes (the last, short one is not)
            assert (runner.store.disk_bytes > 0) == (memory == 0.0)
            runner.close()
        assert res[0]["nll_per_token"] == res[1]["nll_per_token"] and res[0]["new_tokens"] == res[1]["new_tokens"]
        segs = res[0]["segments"]
        assert [s["tokens"] for s in segs] == [255, 256, 88]
        total = sum(s["nll"] * s["tokens"] for s in segs) / sum(s["tokens"] for s in segs)
        assert total == pytest.approx(res[0]["nll_per_token"], rel=1e-6)
    assert res[0]["prefill_tokens_per_s"] > 0


def test_runner_in_bfloat16_tracks_float32():
    """A bfloat16 model streams through the same search (summaries in fp32, attention in bf16, the store in the model's
    dtype by default): its NLL stays within 1% of the fp32 model's and greedy decoding agrees on most tokens."""
    params = dict(region_size=4, top_k=6, merge=2, sink_regions=1)
    model = _tiny_models(params)
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(6))
    cfg = dict(**params, chunk=32, window_regions=4, scales=(1, 2, 8), beam=2, far_positions="compact",
               score="position_free")
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = RecursiveRunner(model.to(dtype), RecursiveConfig(**cfg))
        res[dtype] = runner.run(ids, new_tokens=8, log=None)
        assert runner.store["k"].dtype == dtype and runner.store["kbar0"].dtype == torch.float32
        runner.close()
    assert res[torch.bfloat16]["nll_per_token"] == pytest.approx(res[torch.float32]["nll_per_token"], rel=1e-2)
    same = sum(a == b for a, b in zip(res[torch.bfloat16]["new_tokens"], res[torch.float32]["new_tokens"]))
    assert same >= 6, (res[torch.bfloat16]["new_tokens"], res[torch.float32]["new_tokens"])
