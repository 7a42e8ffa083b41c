"""Recursive bounded-memory mode: equals ms_attention / ms_attention_decode while the state holds the whole
history, keeps a bounded state (and conserves every token in its summaries) when it does not, and the
model-level runner equals the transformers model under attn_implementation="ms_attention"."""

from __future__ import annotations

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


@pytest.mark.parametrize("params,chunk", PARAMS)
def test_prefill_equals_ms_attention_when_state_holds_everything(params, chunk):
    q, k, v = _qkv(2, 4, 2, 150, 8)
    cfg = RecursiveConfig(**params, chunk=chunk, window_regions=1000)
    state = LayerState(cfg, scale=8**-0.5)
    outs = [state.prefill(q[:, :, a : a + chunk], k[:, :, a : a + chunk], v[:, :, a : a + chunk]) for a in range(0, 150, chunk)]
    torch.testing.assert_close(torch.cat(outs, 2), ms_attention(q, k, v, **params), atol=2e-5, rtol=2e-5)
    assert state.summaries() is None


@pytest.mark.parametrize("params,chunk", PARAMS)
def test_decode_equals_ms_attention_decode(params, chunk):
    q, k, v = _qkv(1, 4, 2, 130, 8, seed=1)
    prompt = 37  # not block aligned: the last block is left pending
    cfg = RecursiveConfig(**params, chunk=chunk, window_regions=1000)
    state = LayerState(cfg, scale=8**-0.5)
    pre = state.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    torch.testing.assert_close(pre, ms_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], **params), atol=2e-5, rtol=2e-5)
    for t in range(prompt, 130):
        got = state.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        want = ms_attention_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], **params)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"token {t}: {m}")


def test_state_is_bounded_and_conserves_tokens():
    c, m = 4, 2
    cfg = RecursiveConfig(region_size=c, top_k=6, merge=m, sink_regions=1, chunk=8, window_regions=4, scales=(1, 2, 4),
                          summary_slots=3, summary_top=2)
    B, Hq, Hkv, D = 1, 2, 1, 4
    state = LayerState(cfg, scale=0.5)
    g = torch.Generator().manual_seed(2)
    all_k, sizes = [], []
    for step in range(150):  # 1200 tokens, 300 regions
        q, k, v = torch.randn(B, Hq, 8, D, generator=g), torch.randn(B, Hkv, 8, D, generator=g), torch.randn(B, Hkv, 8, D, generator=g)
        out = state.prefill(q, k, v)
        assert torch.isfinite(out).all()
        all_k.append(k)
        sizes.append(state.state_elements())
    # Bound: sinks + window exact tokens (k and v) plus summaries (k and v) at 3 levels of at most slots+1 entries.
    bound = 2 * (1 + 4) * c * Hkv * D + 2 * 3 * (3 + 1) * Hkv * D + 2 * cfg.scales[0] * Hkv * D
    assert max(sizes) <= bound
    assert max(sizes[75:]) <= max(sizes[:75])  # stops growing: the second half never exceeds the first
    # Every token that left the exact state is in exactly one summary: counts and count-weighted means add up.
    ks, _, logn = state.summaries()
    counts = logn.exp()
    keys = torch.cat(all_k, 2)
    summarised = state.summarised * c
    torch.testing.assert_close(counts.sum(), torch.tensor(float(summarised)))
    mean_from_summaries = (ks[0, 0] * counts[:, None]).sum(0) / counts.sum()
    torch.testing.assert_close(mean_from_summaries, keys[0, 0, c : c + summarised].mean(0), atol=1e-5, rtol=1e-5)


def test_bad_config():
    with pytest.raises(ValueError, match="chunk"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=12)
    with pytest.raises(ValueError, match="window_regions"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, window_regions=3)
    with pytest.raises(ValueError, match="scales"):
        RecursiveConfig(region_size=4, top_k=6, merge=2, chunk=8, scales=(2, 3))


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
