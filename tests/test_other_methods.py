"""S2-Attn, SF-Attn (ds_msattn.attention.s2/sf, hf_shifted) and H2O (ds_msattn.eval.h2o) against their references.

Fast paths against the float64 references on awkward shapes (T not a multiple of the group, GQA, B > 1):
outputs and dq/dk/dv. The reference's rule against literal transcriptions of LongLoRA's two code paths. The
registered implementations in a tiny model, the config/CLI errors, and a tiny-recipe training run per method.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ds_msattn  # noqa: F401  (registers the attention implementations)
from ds_msattn.attention.s2 import shifted_sparse_attention
from ds_msattn.attention.sf import sf_attention
from ds_msattn.attention.shifted_reference import shifted_attention_reference, visible
from tiny_tokenizer import tiny_lm, tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
TINY = "ds_configs/recipes/tiny.yaml"


def _inputs(B, Hq, Hkv, T, D, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=gen, dtype=dtype).requires_grad_() for H in (Hq, Hkv, Hkv)]


SHAPES = [
    pytest.param(dict(B=2, Hq=4, Hkv=2, T=37, D=8), dict(group_size=8), id="T37-G8-gqa2-B2"),
    pytest.param(dict(B=3, Hq=6, Hkv=3, T=29, D=6), dict(group_size=5, shift=2), id="T29-G5-shift2-B3"),
    pytest.param(dict(B=1, Hq=3, Hkv=1, T=17, D=8), dict(group_size=4), id="T17-mqa-odd-heads"),
    pytest.param(dict(B=2, Hq=4, Hkv=4, T=64, D=8), dict(group_ratio=0.25), id="T64-ratio"),
    pytest.param(dict(B=1, Hq=2, Hkv=1, T=5, D=4), dict(group_size=8), id="T5-shorter-than-group"),
    pytest.param(dict(B=1, Hq=1, Hkv=1, T=1, D=4), dict(group_size=4), id="T1"),
]


@pytest.mark.parametrize("wrap,sinks", [(True, 0), (False, 0), (False, 3), (True, 2)],
                         ids=["s2", "s2-nowrap", "sf", "wrap-sinks"])
@pytest.mark.parametrize("shape,group", SHAPES)
def test_fast_path_matches_reference_outputs_and_gradients(shape, group, wrap, sinks):
    q, k, v = _inputs(**shape)
    out = shifted_sparse_attention(q, k, v, wrap=wrap, sink_tokens=sinks, **group)
    ref = shifted_attention_reference(q, k, v, wrap=wrap, sink_tokens=sinks, **group)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=5e-6, rtol=1e-5, msg=name)


def _longlora_noflash(q, k, v, G):
    """LongLoRA forward_noflashattn's S2 core, transcribed: roll half the heads by -G/2, groups, causal, roll back."""
    B, H, T, D = q.shape
    def shift(x):
        x = x.clone()
        x[:, H // 2:] = x[:, H // 2:].roll(-G // 2, dims=2)
        return x.transpose(1, 2).reshape(B * (T // G), G, H, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(shift(q), shift(k), shift(v), is_causal=True)
    out = out.transpose(1, 2).reshape(B, T, H, D)
    out[:, :, H // 2:] = out[:, :, H // 2:].roll(G // 2, dims=1)
    return out.transpose(1, 2)


def _longlora_flash_layout(q, k, v, G):
    """LongLoRA forward_flashattn's varlen segments: [0, G), ... for the first half of the heads, [0, G/2),
    [G/2, 3G/2), ..., [T - G/2, T) for the second (cu_q_lens offset by group_size // 2)."""
    B, H, T, D = q.shape
    out = torch.empty_like(q)
    for heads, bounds in ((slice(0, H // 2), list(range(0, T + 1, G))),
                          (slice(H // 2, H), [0, *range(G // 2, T, G), T])):
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[:, heads, a:b] = F.scaled_dot_product_attention(q[:, heads, a:b], k[:, heads, a:b], v[:, heads, a:b],
                                                                is_causal=True)
    return out


@pytest.mark.parametrize("wrap,longlora", [(True, _longlora_noflash), (False, _longlora_flash_layout)],
                         ids=["roll=forward_noflashattn", "nowrap=forward_flashattn"])
def test_reference_rule_is_longloras_code(wrap, longlora):
    q, k, v = (x.detach().double() for x in _inputs(2, 4, 4, 32, 8, seed=3))
    ref = shifted_attention_reference(q, k, v, group_size=8, wrap=wrap)
    torch.testing.assert_close(ref, longlora(q, k, v, 8))


def test_the_cyclic_shift_leaks_and_sf_does_not():
    rule = dict(T=16, G=4, shift=2, shifted_head=True, sinks=0)
    assert visible(0, 15, wrap=True, **rule)  # LongLoRA's roll: token 0 shares a group with tokens 14, 15
    assert not any(visible(t, j, wrap=False, **rule) for t in range(16) for j in range(t + 1, 16))
    # SF-Attn's sinks: every later query sees tokens 0..3, nothing in the future
    sf = dict(T=16, G=4, shift=2, shifted_head=False, wrap=False, sinks=4)
    assert all(visible(t, j, **sf) for t in range(16) for j in range(min(4, t + 1)))
    assert not any(visible(t, j, **sf) for t in range(16) for j in range(t + 1, 16))


def test_one_group_without_shift_or_sinks_is_dense_causal():
    q, k, v = _inputs(2, 4, 2, 23, 8, seed=1)
    out = shifted_sparse_attention(q, k, v, group_size=64, shift=0)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-5)


def test_sf_attention_is_nowrap_with_four_sinks():
    q, k, v = _inputs(1, 4, 2, 30, 8, seed=2)
    torch.testing.assert_close(sf_attention(q, k, v, group_size=8),
                               shifted_sparse_attention(q, k, v, group_size=8, wrap=False, sink_tokens=4))


@pytest.mark.parametrize("kwargs,says", [
    (dict(group_size=0), "group_size"), (dict(group_size=4, shift=4), "shift"), (dict(group_ratio=1.5), "group_ratio"),
    (dict(group_size=4, shift=-1), "shift"), (dict(group_size=4, sink_tokens=-2), "sink_tokens"),
    (dict(group_size=2.5), "group_size"),
])
def test_bad_parameters_raise_value_error_naming_them(kwargs, says):
    q, k, v = _inputs(1, 2, 1, 8, 4)
    with pytest.raises(ValueError, match=says):
        shifted_sparse_attention(q, k, v, **kwargs)


# ------------------------------------------------------------------ the registered implementations


def _tiny_models(impl: str, shifted: dict, **config):
    from transformers import AutoModelForCausalLM

    from ds_msattn.models import tiny_llama_config

    cfg = tiny_llama_config(**config)
    cfg.shifted_attention = shifted
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl)
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    dense.load_state_dict(model.state_dict())
    return model, dense


@pytest.mark.parametrize("impl,wrap,sinks", [("s2_attention", True, 0), ("sf_attention", False, 4)])
def test_registered_attention_trains_sparse_and_evaluates_dense(impl, wrap, sinks):
    from transformers import AttentionInterface

    model, dense = _tiny_models(impl, {"group_size": 8})
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)

    # train mode: the model's logits equal those of the same model whose attention is the float64 reference
    def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = shifted_attention_reference(query, key, value, group_size=8, wrap=wrap, sink_tokens=sinks, scale=scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("shifted_reference_test", reference_attention)
    oracle = copy.deepcopy(model)
    oracle.config._attn_implementation = "shifted_reference_test"
    model.train(), oracle.train()
    got = model(ids).logits
    torch.testing.assert_close(got, oracle(ids).logits, atol=2e-5, rtol=1e-5)
    assert (got - dense(ids).logits).abs().max() > 1e-3  # the sparse pattern is really in use


def test_model_config_errors_name_the_key():
    from ds_msattn.hf_shifted import shifted_attention_params
    from ds_msattn.models import tiny_llama_config

    cfg = tiny_llama_config()
    cfg.shifted_attention = {"group_sise": 8}
    with pytest.raises(ValueError, match="group_sise"):
        shifted_attention_params(cfg, "s2_attention")
    cfg.shifted_attention = {"group_size": 8, "shift": 9}
    with pytest.raises(ValueError, match="shifted_attention.shift"):
        shifted_attention_params(cfg, "sf_attention")
    cfg.shifted_attention = {"sink_tokens": None}
    assert shifted_attention_params(cfg, "sf_attention")["sink_tokens"] == 4
    assert shifted_attention_params(cfg, "s2_attention")["wrap"] is True


def test_run_config_validates_and_refuses_sequence_parallelism():
    from ds_msattn.config import load_config

    cfg = load_config(TINY, ["--attention.implementation=sf_attention", "--attention.shifted.group_size=64"])
    assert cfg.attention.shifted.group_size == 64
    with pytest.raises(ValueError, match="attention.shifted.group_ratio"):
        load_config(TINY, ["--attention.implementation=s2_attention", "--attention.shifted.group_ratio=0"])
    with pytest.raises(ValueError, match="sequence_parallel_size"):
        load_config(TINY, ["--attention.implementation=s2_attention", "--parallel.sequence_parallel_size=2"])


def _train(out: Path, impl: str) -> list[dict]:
    from subprocess_env import clean_env

    cmd = [sys.executable, "-m", "ds_msattn.train", "--config", TINY, f"--output_dir={out}",
           f"--attention.implementation={impl}", "--attention.shifted.group_size=64", "--data.seq_len=256",
           "--train.max_steps=2", "--checkpoint.interval=0", "--checkpoint.save_final=false", "--tensorboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_recipe_trains_with_each_shifted_attention(tmp_path):
    losses = {impl: _train(tmp_path / impl, impl) for impl in ("sdpa", "s2_attention", "sf_attention")}
    for impl, rows in losses.items():
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows), impl
    # same weights, data and positions: step 1's loss differs only through the attention pattern
    first = {impl: rows[0]["loss"] for impl, rows in losses.items()}
    assert len(set(first.values())) == 3, first
    assert "implementation: sf_attention" in (tmp_path / "sf_attention" / "config.yaml").read_text()


# ------------------------------------------------------------------ H2O KV-cache eviction


def test_keep_indices_hand_case():
    from ds_msattn.eval.h2o import keep_indices

    scores = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.2, 0.05], [0.2, 0.2, 0.1, 0.2, 0.0, 1.0]])
    # budget 3, recent 1: the last entry, and the 2 highest of the others (ties: the earlier token), in order
    assert keep_indices(scores, 3, 1).tolist() == [[0, 2, 5], [0, 1, 5]]
    assert keep_indices(scores, 3, 3).tolist() == [[3, 4, 5], [3, 4, 5]]  # recent only: a sliding window
    assert keep_indices(scores, 2, 0).tolist() == [[0, 2], [0, 5]]


@pytest.mark.parametrize("chunk", [1, 7])
def test_budget_at_least_the_length_is_dense_decoding(chunk):
    from ds_msattn.eval.h2o import H2OModel, H2OPolicy
    from ds_msattn.eval.passkey import greedy_generate

    dense = tiny_lm()
    h2o = H2OModel(copy.deepcopy(dense), H2OPolicy(budget=64, recent=4, chunk=chunk))
    ids = torch.randint(0, 256, (1, 41), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(h2o.model(ids).last_hidden_state, dense.model(ids).last_hidden_state,
                               atol=1e-5, rtol=1e-5)
    assert greedy_generate(h2o, ids[0], 8) == greedy_generate(dense, ids[0], 8)
    cache = h2o(ids).past_key_values
    assert cache.seen == 41 and all(layer.positions[0, 0].tolist() == list(range(41)) for layer in cache.layers)


def test_hand_checked_eviction_with_uniform_attention():
    """q_proj = 0: every query attends uniformly, so a token's score is sum over steps of 1/(keys seen).

    budget 4, recent 2, one token per step. Steps 0-3 fill the cache; step 4 sees 5 keys, scores
    0: 1+1/2+1/3+1/4+1/5, 1: 1/2+...+1/5, 2: 1/3+1/4+1/5 -> token 2 goes (recent 3, 4 stay); step 5 evicts 3, step 6
    evicts 4, step 7 evicts 5: the heavy hitters are the first two tokens, then the last two.
    """
    from ds_msattn.eval.h2o import H2OModel, H2OPolicy

    lm = tiny_lm()
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    h2o = H2OModel(lm, H2OPolicy(budget=4, recent=2, chunk=1))
    cache = h2o(torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))).past_key_values
    h = [sum(1 / n for n in range(a, 6)) for a in (1, 2)]  # scores of tokens 0 and 1 after step 4
    for layer in cache.layers:
        assert (layer.positions == torch.tensor([0, 1, 6, 7])).all()
        # tokens 0, 1: step 4's sums plus 1/5 in each of steps 5, 6, 7; 6: 1/5 + 1/5; 7: 1/5; times the 2 query
        # heads that share each kv head (4 heads, 2 kv heads)
        want = 2 * torch.tensor([h[0] + 3 / 5, h[1] + 3 / 5, 2 / 5, 1 / 5], dtype=torch.float64)
        torch.testing.assert_close(layer.scores[0, 0], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("budget,recent,chunk", [(10, 3, 4), (6, 0, 1), (8, 8, 3)],
                         ids=["mixed", "heavy-only", "window"])
def test_cache_path_matches_the_step_by_step_reference(budget, recent, chunk):
    from transformers import AttentionInterface

    from ds_msattn.eval.h2o import H2OModel, H2OPolicy
    from ds_msattn.eval.h2o_reference import h2o_attention_reference

    T = 30
    steps = [chunk] * (T // chunk) + ([T % chunk] if T % chunk else [])
    dense = tiny_lm()
    kept = {}

    def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, kept[module.layer_idx] = h2o_attention_reference(query, key, value, steps=steps, budget=budget,
                                                              recent=recent, scale=scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("h2o_reference_test", reference_attention)
    oracle = copy.deepcopy(dense)
    oracle.config._attn_implementation = "h2o_reference_test"
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(3))
    h2o = H2OModel(copy.deepcopy(dense), H2OPolicy(budget=budget, recent=recent, chunk=chunk))
    out = h2o.model(ids)
    with torch.no_grad():
        want = oracle.model(ids).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, want, atol=2e-5, rtol=1e-5)
    for i, layer in enumerate(out.past_key_values.layers):
        assert layer.positions[0].tolist() == kept[i][0], f"layer {i}"
    assert (out.last_hidden_state - dense.model(ids).last_hidden_state).abs().max() > 1e-3  # eviction acts


@pytest.mark.parametrize("kwargs,says", [
    (dict(budget=0, recent=0), "kv_budget"), (dict(budget=4, recent=5), "recent"),
    (dict(budget=4, recent=-1), "recent"),
    (dict(budget=4, recent=2, chunk=0), "kv_chunk"),
])
def test_bad_policy_raises_value_error_naming_it(kwargs, says):
    from ds_msattn.eval.h2o import H2OPolicy

    with pytest.raises(ValueError, match=says):
        H2OPolicy(**kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_eval_cli_ppl_and_passkey_with_h2o(tiny_dir, tmp_path):
    from ds_msattn.eval.cli import main
    from ds_msattn.eval.h2o import H2OModel, H2OPolicy
    from ds_msattn.eval.ppl import perplexity
    from ds_msattn.models import load_model, load_tokenizer

    out = tmp_path / "ppl.json"
    assert main(["ppl", "--model", str(tiny_dir), "--text-file", str(tiny_dir / "doc.txt"), "--context", "128",
                 "--kv-cache", "h2o", "--kv-budget", "32", "--recent", "8", "--kv-chunk", "16", "--output", str(out),
                 "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["kv_cache"] == {"policy": "h2o", "budget": 32, "recent": 8, "heavy": 24, "chunk": 16}
    model = load_model(str(tiny_dir)).eval()
    ids = torch.tensor(load_tokenizer(str(tiny_dir))((tiny_dir / "doc.txt").read_text())["input_ids"])
    quiet = lambda *_: None  # noqa: E731
    want = perplexity(H2OModel(copy.deepcopy(model), H2OPolicy(32, 8, 16)), [ids], 128, log=quiet)
    dense = perplexity(model, [ids], 128, log=quiet)
    assert rep["results"][0]["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    assert rep["results"][0]["ppl"] != pytest.approx(dense["ppl"], rel=1e-4)
    pk = tmp_path / "pk.json"
    assert main(["passkey", "--model", str(tiny_dir), "--lengths", "200", "--depths", "0.5", "--trials", "1",
                 "--kv-cache", "h2o", "--kv-budget", "48", "--rope", "crd-ntk", "--output", str(pk), "--quiet"]) == 0
    assert json.loads(pk.read_text())["kv_cache"]["recent"] == 24


H2O_FLAG_ERRORS = [
    pytest.param(["--kv-cache", "h2o"], "--kv-budget", id="no-budget"),
    pytest.param(["--kv-budget", "16"], "--kv-cache h2o", id="budget-without-h2o"),
    pytest.param(["--kv-cache", "h2o", "--kv-budget", "16", "--recent", "17"], "recent", id="recent-over-budget"),
    pytest.param(["--kv-cache", "h2o", "--kv-budget", "0"], "kv_budget", id="zero-budget"),
    pytest.param(["--kv-cache", "h2o", "--kv-budget", "16", "--kv-chunk", "0"], "kv_chunk", id="zero-chunk"),
    pytest.param(["--kv-cache", "h2o", "--kv-budget", "16", "--attn", "ms_attention"], "--attn sdpa", id="not-dense"),
]


def _ppl_args(tmp_path, extra):
    return ["ppl", "--model", str(tmp_path / "no_model"), "--text-file", "README.md", "--context", "64",
            "--output", str(tmp_path / "p.json"), *extra]


@pytest.mark.parametrize("extra,says", H2O_FLAG_ERRORS)
def test_h2o_flag_errors_exit_2_before_loading(tmp_path, capsys, extra, says):
    from ds_msattn.eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(_ppl_args(tmp_path, extra))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "error" in lines[0] and says in lines[0], lines


def test_h2o_flag_error_is_one_line_from_the_command(tmp_path):
    from subprocess_env import clean_env

    code = "import sys\nfrom ds_msattn.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["eval", *_ppl_args(tmp_path, ["--kv-cache", "h2o", "--kv-budget", "16", "--recent", "17"])]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=clean_env(1) | {"DS_MSATTN_VERBOSE": "0"},
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "error" in lines[0] and "recent must be <= kv_budget=16" in lines[0] and "Traceback" not in proc.stderr
