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
