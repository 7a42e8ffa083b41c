"""transformers integration: registration, config parameters, padding, packing, model families."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import ds_msattn  # noqa: F401  (registers "ms_attention")
from ds_msattn.hf import DEFAULT_MS_ATTENTION, ms_attention_params
from ds_msattn.models import tiny_config

FAMILIES = ["llama", "mistral", "qwen2"]
SPARSE = {"region_size": 4, "top_k": 4, "merge": 2, "sink_regions": 1}
DENSE = {"region_size": 4, "top_k": 64, "merge": 2, "sink_regions": 1}


def _model(family, params, attn="ms_attention", seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.ms_attention = dict(params)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _ids(B=2, T=100, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_regime_gives_sdpa_logits(family):
    model = _model(family, DENSE)
    ids = _ids()
    with torch.no_grad():
        ms = model(ids).logits
        model.set_attn_implementation("sdpa")
        dense = model(ids).logits
    torch.testing.assert_close(ms, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_regime_matches_reference_backend(family):
    model = _model(family, SPARSE)
    ids = _ids(B=1, T=70)
    out = model(ids).logits
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.ms_attention = {**SPARSE, "backend": "reference"}
    ref = model(ids).logits
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-3, rtol=1e-3, msg=lambda e, n=n: f"{n}: {e}")
    model.set_attn_implementation("sdpa")
    assert (model(ids).logits - out).abs().max() > 1e-3  # the sparse regime is really sparse


def test_right_padding_is_exact():
    model = _model("llama", SPARSE)
    ids = _ids(B=2, T=90)
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, 61:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :61]).logits
        first = model(ids[:1]).logits
    torch.testing.assert_close(padded[1, :61], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], first[0], atol=1e-5, rtol=1e-5)


def test_left_padding_raises():
    model = _model("llama", SPARSE)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="right padding"):
        model(_ids(T=40), attention_mask=mask)


def test_packed_sequences_raise_and_wrapped_positions_pass():
    model = _model("llama", SPARSE)
    ids = _ids(B=1, T=40)
    packed = torch.cat([torch.arange(25), torch.arange(15)])[None]
    with pytest.raises(ValueError, match="packed"):
        model(ids, position_ids=packed)
    wrapped = (torch.arange(40) + 30) % 32
    with torch.no_grad():
        model(ids, position_ids=wrapped[None], positions_wrapped=True)


def test_params_from_config_and_defaults(tmp_path):
    model = _model("llama", {"region_size": 8})
    assert ms_attention_params(model.config) == {**DEFAULT_MS_ATTENTION, "region_size": 8}
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ms_attention")
    assert again.config.ms_attention == {"region_size": 8}
    assert again.config._attn_implementation == "ms_attention"


def test_bad_config_names_key():
    model = _model("llama", {"region_sise": 8})
    with pytest.raises(ValueError, match="region_sise"):
        model(_ids(T=10))
    model = _model("llama", {"region_size": 0})
    with pytest.raises(ValueError, match="region_size"):
        model(_ids(T=10))


def test_set_attn_implementation_switches():
    model = _model("llama", SPARSE, attn="sdpa")
    model.set_attn_implementation("ms_attention")
    assert model.config._attn_implementation == "ms_attention"


# ---------------------------------------------------------------- options that rotate (docs/design.md)
ROTATING = {"far_positions": "compact", "score": "position_free", "select_per": "kv_group"}


@pytest.mark.parametrize(
    "rope,T",
    [
        pytest.param({"rope_type": "default", "rope_theta": 10000.0}, 100, id="default"),
        pytest.param({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, 150, id="dynamic-past-L0"),
        pytest.param({"rope_type": "crd_ntk", "rope_theta": 10000.0, "alpha": 4.0, "cycle_length": 256,
                      "original_max_position_embeddings": 64}, 100, id="crd_ntk"),
    ],
)
def test_rope_frequencies_are_the_models_own(rope, T):
    from ds_msattn.hf import rope_frequencies

    cfg = tiny_config("llama", max_position_embeddings=64, rope_parameters=rope)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    pos = torch.arange(T)[None]
    with torch.no_grad():
        model(_ids(B=1, T=T), position_ids=pos)
    torch.testing.assert_close(rope_frequencies(model.config, pos, T, "cpu"), model.model.rotary_emb.inv_freq.float())


def test_rotating_options_in_the_dense_regime_give_sdpa_logits():
    model = _model("llama", {**DENSE, **ROTATING})
    ids = _ids()
    with torch.no_grad():
        ms = model(ids).logits
        model.set_attn_implementation("sdpa")
        dense = model(ids).logits
    torch.testing.assert_close(ms, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [ROTATING, {"far_positions": "capped", "far_window": 12}], ids=["compact-pf-kv", "capped"])
def test_sparse_options_match_reference_backend_with_wrapped_positions(options):
    """The model's own frequencies and CRD-NTK's wrapped position_ids reach every backend: logits and gradients."""
    model = _model("llama", {**SPARSE, **options})
    ids = _ids(B=1, T=70)
    wrapped = ((torch.arange(70) + 50) % 64)[None]
    out = model(ids, position_ids=wrapped, positions_wrapped=True).logits
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.ms_attention = {**SPARSE, **options, "backend": "reference"}
    ref = model(ids, position_ids=wrapped, positions_wrapped=True).logits
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-3, rtol=1e-3, msg=lambda e, n=n: f"{n}: {e}")
    model.config.ms_attention = dict(SPARSE)
    assert (model(ids, position_ids=wrapped, positions_wrapped=True).logits - out).abs().max() > 1e-3


def test_decoding_with_options_gets_the_cache_positions():
    """While decoding only the new tokens' positions arrive: the keys' positions continue them backwards."""
    from ds_msattn.hf import _rotary_kwargs

    cfg = tiny_config("llama")
    params = {**DEFAULT_MS_ATTENTION, "score": "position_free"}
    q = torch.zeros(1, 4, 2, 16)
    got = _rotary_kwargs(cfg, params, torch.tensor([[105, 106]]), q, Tk=30)
    assert got["position_ids"].tolist() == [list(range(77, 107))]
    paper_rule = {**DEFAULT_MS_ATTENTION, "far_positions": "exact", "score": "rope"}
    assert _rotary_kwargs(cfg, paper_rule, None, q, Tk=30) == {}  # nothing rotates: nothing computed


def test_decoding_with_options_acts():
    from transformers import DynamicCache

    ids = _ids(B=1, T=81)
    logits = []
    for params in ({**SPARSE, "far_positions": "capped", "far_window": 8, "score": "position_free"}, SPARSE):
        model = _model("llama", params)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids[:, :80], past_key_values=cache, use_cache=True)
            logits.append(model(ids[:, 80:], past_key_values=cache, use_cache=True,
                                position_ids=torch.tensor([[80]])).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_bad_option_in_config_names_key():
    model = _model("llama", {**SPARSE, "far_positions": "near"})
    with pytest.raises(ValueError, match="far_positions"):
        model(_ids(T=10))
