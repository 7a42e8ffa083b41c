"""ESA (ds_msattn.attention.esa, esa_calibrate, hf_esa): fast path against the float64 reference, the selection
rule on hand-made scores, the calibration's fit and file round trip, the registered attention in a tiny Llama
(direct call, dense limit, KV-cache decoding), parameter errors and the command-line error paths.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ds_msattn  # noqa: F401  (registers the attention implementations)
from ds_msattn.attention.esa import esa_attention, select_middle, selection_vectors
from ds_msattn.attention.esa_calibrate import (ESAProjections, calibrate, fit_projection, load_projections,
                                               save_projections)
from ds_msattn.attention.esa_reference import esa_attention_reference
from tiny_tokenizer import tiny_lm, tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
TINY = "ds_configs/recipes/tiny.yaml"


def _inputs(B, Hq, Hkv, T, D, Tq=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T if Tq is None else Tq, D, generator=gen, dtype=dtype)
    k, v = (torch.randn(B, Hkv, T, D, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


def _inv_freq(D, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def _dense(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)


CASES = [
    pytest.param(dict(B=2, Hq=4, Hkv=2, T=37, D=8),
                 dict(top_k=5, sink_tokens=2, local_window=6, chunk_size=5, proximity=1), id="T37-chunk5-gqa-B2"),
    pytest.param(dict(B=1, Hq=3, Hkv=1, T=23, D=8),
                 dict(top_k=4, sink_tokens=1, local_window=3, chunk_size=8, proximity=2), id="T23-mqa-eps2"),
    pytest.param(dict(B=1, Hq=6, Hkv=3, T=29, D=4),
                 dict(top_k=3, sink_tokens=2, local_window=4, chunk_size=6, proximity=0, select_per="kv_group"),
                 id="T29-kv_group-eps0"),
    pytest.param(dict(B=1, Hq=4, Hkv=2, T=5, D=8),
                 dict(top_k=2, sink_tokens=4, local_window=8, chunk_size=2), id="T5-shorter-than-sink+local"),
    pytest.param(dict(B=2, Hq=2, Hkv=2, T=30, D=8),
                 dict(top_k=100, sink_tokens=1, local_window=3, chunk_size=4), id="k-larger-than-history"),
    pytest.param(dict(B=1, Hq=2, Hkv=1, T=1, D=4), dict(top_k=2, sink_tokens=1, local_window=1, chunk_size=3),
                 id="T1"),
    pytest.param(dict(B=1, Hq=4, Hkv=2, T=31, D=8, Tq=3),
                 dict(top_k=5, sink_tokens=2, local_window=6, chunk_size=2), id="decode-3-of-31"),
    pytest.param(dict(B=1, Hq=4, Hkv=2, T=26, D=8),
                 dict(top_k=4, sink_tokens=3, local_window=5, chunk_size=4, far_distance=2), id="far-distance-2"),
]


@pytest.mark.parametrize("far", ["fixed", "exact"])
@pytest.mark.parametrize("shape,params", CASES)
def test_fast_path_matches_reference(shape, params, far):
    q, k, v = _inputs(**shape)
    rotary = dict(rope_inv_freq=_inv_freq(shape["D"])) if far == "fixed" else {}
    out = esa_attention(q, k, v, far_positions=far, **params, **rotary)
    ref = esa_attention_reference(q, k, v, far_positions=far, **params, **rotary)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    # float32 inputs: the same within float32 rounding (the selection does not flip on these inputs)
    out32 = esa_attention(q.float(), k.float(), v.float(), far_positions=far, **params, **rotary)
    torch.testing.assert_close(out32.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("select_per", ["layer", "kv_group"])
def test_fast_path_with_projection_and_positions_matches_reference(select_per):
    B, Hq, Hkv, T, D, r = 2, 4, 2, 33, 8, 3
    q, k, v = _inputs(B, Hq, Hkv, T, D, seed=4)
    G, n = (1, Hkv * D) if select_per == "layer" else (Hkv, D)
    gen = torch.Generator().manual_seed(5)
    projection = (torch.randn(G, n, r, generator=gen), torch.randn(G, n, r, generator=gen))
    params = dict(top_k=4, sink_tokens=2, local_window=5, chunk_size=4, proximity=1, select_per=select_per,
                  rope_inv_freq=_inv_freq(D), position_ids=torch.arange(100, 100 + T))
    out = esa_attention(q, k, v, projection=projection, **params)
    ref, chosen = esa_attention_reference(q, k, v, projection=projection, return_selection=True, **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    exact, chosen_exact = esa_attention_reference(q, k, v, return_selection=True, **params)
    assert chosen != chosen_exact  # a rank-3 random projection selects other tokens: it is really in use
    assert (out - exact).abs().max() > 1e-3


def test_k_larger_than_the_history_selects_every_middle_token():
    q, k, v = _inputs(1, 2, 1, 40, 8, seed=2)
    _, chosen = esa_attention_reference(q, k, v, top_k=100, sink_tokens=2, local_window=5, chunk_size=8,
                                        far_positions="exact", return_selection=True)
    for (_, a, _), tokens in chosen.items():
        assert tokens == list(range(2, max(2, a - 5)))


@pytest.mark.parametrize("shape,params", [
    (dict(B=2, Hq=4, Hkv=2, T=37, D=8), dict(top_k=37, sink_tokens=3, local_window=4, chunk_size=5)),
    (dict(B=1, Hq=3, Hkv=1, T=50, D=16), dict(top_k=64, sink_tokens=0, local_window=0, chunk_size=7, proximity=3)),
    (dict(B=1, Hq=4, Hkv=4, T=19, D=8), dict(top_k=19, sink_tokens=5, local_window=2, chunk_size=1,
                                             select_per="kv_group")),
])
def test_top_k_covering_the_middle_is_dense_causal(shape, params):
    q, k, v = _inputs(**shape, dtype=torch.float32)
    out = esa_attention(q, k, v, far_positions="exact", **params)
    torch.testing.assert_close(out, _dense(q, k, v), atol=2e-6, rtol=1e-5)


def test_fixed_positions_with_everything_local_is_dense_and_otherwise_not():
    q, k, v = _inputs(1, 4, 2, 30, 8, dtype=torch.float32, seed=3)
    rotary = dict(rope_inv_freq=_inv_freq(8))
    local = esa_attention(q, k, v, top_k=0, sink_tokens=0, local_window=30, chunk_size=4, **rotary)
    torch.testing.assert_close(local, _dense(q, k, v), atol=2e-6, rtol=1e-5)
    # the same keys, but the far ones at distance w: no longer dense
    far = esa_attention(q, k, v, top_k=30, sink_tokens=2, local_window=3, chunk_size=4, **rotary)
    assert (far - _dense(q, k, v)).abs().max() > 1e-3


def test_selection_rule_on_hand_made_scores():
    # eq. 8, proximity: one peak lifts its neighbours; ties go to the earlier token
    s = torch.tensor([[[0.0, 5.0, 0.0, 0.0, 1.0, 0.0]]])  # [1 group, 1 query, 6 middle tokens]
    assert select_middle(s, 2, 0).tolist() == [[1, 4]]
    assert select_middle(s, 2, 1).tolist() == [[0, 1]]  # pooled: 5 5 5 1 1 1
    assert select_middle(s, 4, 1).tolist() == [[0, 1, 2, 3]]
    assert select_middle(s, 9, 1).tolist() == [[0, 1, 2, 3, 4, 5]]  # k above the middle: all of it
    # eq. 4: each query's scores are shifted by its own maximum, then the max over the chunk's queries
    s = torch.tensor([[[10.0, 9.0, 0.0], [0.0, 1.0, 2.0]]])
    assert select_middle(s, 2, 0).tolist() == [[0, 2]]  # shifted: [0, -1, -10], [-2, -1, 0] -> max [0, -1, 0]
    assert s.amax(-2).topk(2).indices.sort().values.tolist() == [[0, 1]]  # (raw maxima would pick 0 and 1)


def test_layer_selection_sums_over_every_query_head():
    q, k, _ = _inputs(1, 4, 2, 6, 4, seed=7)
    qs, ks = selection_vectors(q, k, "layer")
    want = sum(q[0, h] @ k[0, h // 2].T for h in range(4))  # [6, 6]
    torch.testing.assert_close(qs[0, 0] @ ks[0, 0].T, want)
    qg, kg = selection_vectors(q, k, "kv_group")
    torch.testing.assert_close(qg[0, 1] @ kg[0, 1].T, q[0, 2] @ k[0, 1].T + q[0, 3] @ k[0, 1].T)


# ------------------------------------------------------------------ projections


def test_lstsq_fit_is_the_best_rank_r_score_approximation_and_beats_pca():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)
    Q = torch.randn(300, 1, 12, generator=gen, dtype=torch.float64) @ mix
    K = torch.randn(200, 1, 12, generator=gen, dtype=torch.float64) @ mix.T + 0.3
    S = Q[:, 0] @ K[:, 0].T
    tail = torch.linalg.svdvals(S)
    for r in (2, 5):
        pq, pk = fit_projection(Q, K, r, "lstsq")
        err = torch.linalg.norm((Q[:, 0] @ pq[0].double()) @ (K[:, 0] @ pk[0].double()).T - S)
        assert err == pytest.approx(float(tail[r:].square().sum().sqrt()), rel=1e-4)  # Eckart-Young optimum
        cq, ck = fit_projection(Q, K, r, "pca")
        pca_err = torch.linalg.norm((Q[:, 0] @ cq[0].double()) @ (K[:, 0] @ ck[0].double()).T - S)
        assert err < pca_err
    # the first r' columns of a rank-r fit are the rank-r' fit
    full, small = fit_projection(Q, K, 5, "lstsq"), fit_projection(Q, K, 2, "lstsq")
    torch.testing.assert_close(full[0][..., :2], small[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lstsq", "pca"])
@pytest.mark.parametrize("select_per", ["layer", "kv_group"])
def test_full_rank_projection_selects_as_the_exact_scores(method, select_per):
    B, Hq, Hkv, T, D = 1, 4, 2, 40, 8
    q, k, v = _inputs(B, Hq, Hkv, T, D, seed=9)
    qs, ks = selection_vectors(q, k, select_per)  # calibration vectors that span the space
    n = qs.shape[-1]
    projection = fit_projection(qs[0].transpose(0, 1), ks[0].transpose(0, 1), n, method)
    params = dict(top_k=4, sink_tokens=2, local_window=5, chunk_size=6, proximity=1, select_per=select_per,
                  far_positions="exact")
    _, with_proj = esa_attention_reference(q, k, v, projection=projection, return_selection=True, **params)
    _, exact = esa_attention_reference(q, k, v, return_selection=True, **params)
    assert with_proj == exact
    torch.testing.assert_close(esa_attention(q, k, v, projection=projection, **params),
                               esa_attention(q, k, v, **params), atol=1e-10, rtol=1e-10)


def _sequences(n=3, T=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (T,), generator=gen) for _ in range(n)]


def test_calibration_round_trip(tmp_path):
    model = tiny_lm()
    proj = calibrate(model, _sequences(), rank=6, local_window=16)
    assert proj.meta["num_layers"] == 2 and proj.meta["far_distance"] == 16 and proj.meta["tokens"] == 180
    assert proj.query[0].shape == (1, 2 * 16, 6)  # layer selection: kv heads concatenated
    save_projections(tmp_path, proj)
    back = load_projections(tmp_path / "esa_projections.json")
    assert back.meta == {**proj.meta, "format": 1}
    for a, b in zip(proj.query + proj.key, back.query + back.key):
        assert torch.equal(a, b)
    assert torch.equal(back.layer(1, 4)[1], proj.key[1][..., :4])
    with pytest.raises(ValueError, match="rank must be <= the calibrated rank 6"):
        back.layer(0, 7)
    # deterministic: a second run fits the same matrices; kv_group has one [D, r] pair per kv head
    again = calibrate(model, _sequences(), rank=6, local_window=16)
    assert all(torch.equal(a, b) for a, b in zip(proj.query, again.query))
    assert calibrate(model, _sequences(), rank=6, select_per="kv_group", local_window=16).key[0].shape == (2, 16, 6)
    with pytest.raises(FileNotFoundError):
        load_projections(tmp_path / "nowhere")


def test_calibration_fits_the_vectors_the_attention_scores():
    """Full rank on enough tokens: the fitted pair reproduces the layer's exact selection scores (rotated to w)."""
    from ds_msattn.attention.esa import far_vectors, make_params
    from ds_msattn.attention.esa_calibrate import _captured, _register_capture

    model = tiny_lm()
    proj = calibrate(model, _sequences(T=80), rank=32, local_window=16)
    _register_capture()
    ids = _sequences(1, 50, seed=1)[0]
    model.config._attn_implementation = "esa_capture"
    with torch.no_grad():
        model.model(input_ids=ids[None], use_cache=False)
    model.config._attn_implementation = "sdpa"
    query, key = _captured.pop(1)[0]
    _captured.clear()
    pos = torch.arange(50)[None]
    q_far, k_far = far_vectors(query, key, make_params(local_window=16), _inv_freq(16), pos)
    qs, ks = selection_vectors(q_far, k_far, "layer")
    exact = qs[0, 0] @ ks[0, 0].T
    approx = (qs[0, 0] @ proj.query[1][0]) @ (ks[0, 0] @ proj.key[1][0]).T
    torch.testing.assert_close(approx, exact, atol=1e-3 * exact.abs().max().item(), rtol=0)


# ------------------------------------------------------------------ the registered attention


def _esa_model(esa: dict, **config):
    from transformers import AutoModelForCausalLM

    from ds_msattn.models import tiny_llama_config

    cfg = tiny_llama_config(**config)
    cfg.esa_attention = esa
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="esa_attention").eval()
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    dense.load_state_dict(model.state_dict())
    return model, dense


def test_registered_attention_equals_the_direct_call(tmp_path):
    from transformers import AttentionInterface

    base = tiny_lm()
    save_projections(tmp_path, calibrate(base, _sequences(), rank=8, local_window=6))
    esa = dict(top_k=5, sink_tokens=2, local_window=6, chunk_size=7, proximity=1, projections=str(tmp_path), rank=5)
    model, dense = _esa_model(esa)
    projections = load_projections(tmp_path)
    calls = []

    def direct(module, query, key, value, attention_mask, scaling=None, **kwargs):
        pq, pk = projections.query[module.layer_idx][..., :5], projections.key[module.layer_idx][..., :5]
        calls.append(module.layer_idx)
        out = esa_attention_reference(query, key, value, top_k=5, sink_tokens=2, local_window=6, chunk_size=7,
                                      proximity=1, projection=(pq, pk), rope_inv_freq=_inv_freq(16), scale=scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("esa_direct_test", direct)
    oracle = copy.deepcopy(model)
    oracle.config._attn_implementation = "esa_direct_test"
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, oracle(ids).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert calls == [0, 1] and (got - dense(ids).logits).abs().max() > 1e-3  # ESA really selects


def test_registered_attention_covering_everything_is_dense():
    model, dense = _esa_model(dict(top_k=64, sink_tokens=4, local_window=8, chunk_size=5, far_positions="exact"))
    ids = torch.randint(0, 256, (1, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_decoding_with_a_kv_cache_equals_the_full_forward():
    """chunk_size 1: every query is its own chunk, so token-by-token decoding with a cache is the full forward."""
    from transformers import DynamicCache

    model, _ = _esa_model(dict(top_k=4, sink_tokens=2, local_window=5, chunk_size=1))
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :20], past_key_values=cache, use_cache=True).logits]
        for t in range(20, 30):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,says", [
    (dict(top_k=-1), "top_k"), (dict(chunk_size=0), "chunk_size"), (dict(proximity=-1), "proximity"),
    (dict(sink_tokens=1.5), "sink_tokens"), (dict(local_window=True), "local_window"),
    (dict(select_per="head"), "select_per must be one of"), (dict(far_positions="compact"), "far_positions"),
    (dict(far_distance=-3), "far_distance"), (dict(scale=-1.0), "scale"),
    (dict(rope_inv_freq=None), "rope_inv_freq"), (dict(rope_inv_freq=torch.ones(3)), "rope_inv_freq"),
    (dict(position_ids=torch.arange(5)), "position_ids"),
    (dict(projection=(torch.zeros(1, 7, 2), torch.zeros(1, 7, 2))), r"projection query matrix must have shape"),
])
def test_bad_parameters_raise_value_error_naming_them(kwargs, says):
    q, k, v = _inputs(1, 2, 1, 8, 4)
    call = dict(rope_inv_freq=_inv_freq(4), **{key: val for key, val in kwargs.items() if key != "rope_inv_freq"})
    if "rope_inv_freq" in kwargs:
        call["rope_inv_freq"] = kwargs["rope_inv_freq"]
    with pytest.raises(ValueError, match=says):
        esa_attention(q, k, v, **call)


def test_bad_tensors_raise_value_error():
    q, k, v = _inputs(1, 2, 1, 8, 4)
    for args, says in [((q[0], k, v), "q must have 4 dimensions"), ((q, k[:, :, :5], v[:, :, :5]), "more tokens"),
                       ((q, k, v[:, :, :7]), "sequence lengths differ"), ((q[:, :1].expand(1, 3, 8, 4), k.expand(1, 2, 8, 4), v.expand(1, 2, 8, 4)), "multiple"),
                       ((q.float(), k, v), "share a dtype")]:
        with pytest.raises(ValueError, match=says):
            esa_attention(*args, far_positions="exact")


def test_model_config_errors_name_the_key(tmp_path):
    from ds_msattn.hf_esa import esa_attention_params, layer_projection
    from ds_msattn.models import tiny_llama_config

    cfg = tiny_llama_config()
    for given, says in [({"top_kk": 3}, "top_kk"), ({"chunk_size": 0}, "esa_attention.chunk_size"),
                        ({"rank": 4}, "rank needs projections"), ({"projections": 3}, "projections must be")]:
        cfg.esa_attention = given
        with pytest.raises(ValueError, match=says):
            esa_attention_params(cfg)
    save_projections(tmp_path, calibrate(tiny_lm(), _sequences(1), rank=4, local_window=16))
    cfg.esa_attention = {"projections": str(tmp_path), "local_window": 32}
    with pytest.raises(ValueError, match="far_distance=16.*far_distance=32"):
        layer_projection(cfg, esa_attention_params(cfg), 0, 2, 16)
    cfg.esa_attention = {"projections": str(tmp_path), "local_window": 16, "rank": 5}
    with pytest.raises(ValueError, match="esa_attention.rank must be <= the calibrated rank 4"):
        layer_projection(cfg, esa_attention_params(cfg), 0, 2, 16)


def test_training_with_esa_is_a_clear_error():
    from ds_msattn.config import load_config

    with pytest.raises(ValueError, match="esa_attention is an inference method"):
        load_config(TINY, ["--attention.implementation=esa_attention"])


# ------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_esa"))


def test_calibrate_cli_writes_what_calibrate_fits(tiny_dir, tmp_path, capsys):
    from ds_msattn.attention.esa_calibrate import corpus_sequences, main
    from ds_msattn.models import load_model, load_tokenizer

    out = tmp_path / "proj"
    assert main(["--model", str(tiny_dir), "--text-file", str(tiny_dir / "doc.txt"), "--out", str(out),
                 "--tokens", "300", "--rank", "4", "--seq-len", "100", "--local-window", "16"]) == 0
    saved = load_projections(out)
    assert saved.meta["tokens"] == 300 and saved.meta["sequences"] == 3 and saved.meta["rank"] == 4
    seqs = corpus_sequences(load_tokenizer(str(tiny_dir)), {"doc": (tiny_dir / "doc.txt").read_text()}, 300, 100)
    want = calibrate(load_model(str(tiny_dir)).eval(), seqs, rank=4, local_window=16)
    for a, b in zip(saved.query + saved.key, want.query + want.key):
        torch.testing.assert_close(a, b)


def test_eval_ppl_with_esa_attention(tiny_dir, tmp_path):
    from ds_msattn.eval.cli import main
    from ds_msattn.eval.ppl import perplexity
    from ds_msattn.models import load_model, load_tokenizer

    out = tmp_path / "ppl.json"
    assert main(["ppl", "--model", str(tiny_dir), "--text-file", str(tiny_dir / "doc.txt"), "--context", "128",
                 "--attn", "esa_attention", "--esa-top-k", "8", "--esa-sink-tokens", "4", "--esa-local-window", "16",
                 "--esa-chunk", "32", "--output", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["esa_attention"]["top_k"] == 8 and rep["esa_attention"]["proximity"] == 1
    assert rep["setup"].startswith("esa_attention(k=8,I=4,L=16,C=32,eps=1,layer,fixed,w=16)")
    esa = dict(top_k=8, sink_tokens=4, local_window=16, chunk_size=32)
    model = load_model(str(tiny_dir), attn_implementation="esa_attention", esa_attention=esa).eval()
    dense = load_model(str(tiny_dir)).eval()
    ids = torch.tensor(load_tokenizer(str(tiny_dir))((tiny_dir / "doc.txt").read_text())["input_ids"])
    quiet = lambda *_: None  # noqa: E731
    assert rep["results"][0]["ppl"] == pytest.approx(perplexity(model, [ids], 128, log=quiet)["ppl"], rel=1e-6)
    assert rep["results"][0]["ppl"] != pytest.approx(perplexity(dense, [ids], 128, log=quiet)["ppl"], rel=1e-4)


ESA_FLAG_ERRORS = [
    pytest.param(["--esa-top-k", "8"], "--esa-top-k needs --attn esa_attention", id="flag-without-esa"),
    pytest.param(["--attn", "esa_attention", "--esa-chunk", "0"], "chunk_size must be an integer >= 1", id="chunk0"),
    pytest.param(["--attn", "esa_attention", "--esa-rank", "4"], "rank needs projections", id="rank-alone"),
    pytest.param(["--attn", "esa_attention", "--kv-cache", "h2o", "--kv-budget", "8"], "--attn sdpa", id="with-h2o"),
]


@pytest.mark.parametrize("extra,says", ESA_FLAG_ERRORS)
def test_eval_esa_flag_errors_exit_2_before_loading(tmp_path, capsys, extra, says):
    from ds_msattn.eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ppl", "--model", str(tmp_path / "no_model"), "--text-file", "README.md", "--context", "64",
              "--output", str(tmp_path / "p.json"), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and says in lines[0], lines


def test_eval_stream_refuses_esa(tmp_path, capsys):
    from ds_msattn.eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["stream", "--model", str(tmp_path / "no_model"), "--text-file", "README.md", "--attn", "esa_attention",
              "--output", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "esa_attention is for eval passkey and eval ppl, not stream" in err


@pytest.mark.parametrize("extra,says", [
    (["--rank", "0"], "rank must be an integer >= 1"),
    (["--text-file", "no/such/file.txt"], "No such file or directory: no/such/file.txt"),
    (["--method", "svd"], "invalid choice"),
    (["--local-window", "-1"], "local_window must be an integer >= 0"),
    (["--tokens", "1"], "--tokens must be >= 2"),
])
def test_calibrate_cli_errors_are_one_line(tmp_path, capsys, extra, says):
    from ds_msattn.cli import main

    args = ["esa-calibrate", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "o"), *extra]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and says in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_calibrate_cli_error_from_the_command_has_no_traceback(tmp_path):
    from subprocess_env import clean_env

    code = "import sys\nfrom ds_msattn.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["esa-calibrate", "--model", str(tmp_path / "no_model"), "--rank", "0"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=clean_env(1) | {"DS_MSATTN_VERBOSE": "0"},
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "ds-msattn esa-calibrate: error: rank must be an integer >= 1, got 0" in lines[0], lines
    assert "Traceback" not in proc.stderr
