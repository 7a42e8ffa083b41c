"""CRD-NTK: the base formula, the registered rope type inside a real model, the schedule, shifts and shards."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ds_msattn import positions as P


def tiny_model(**overrides):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("alpha,L,L0,d", [(16, 32768, 4096, 128), (1, 128, 128, 8), (2.5, 1000, 300, 16)])
def test_ntk_base_formula(alpha, L, L0, d):
    expected = 1e4 * (alpha * L / L0 - (alpha - 1)) ** (d / (d - 2))
    assert P.ntk_base(1e4, d, alpha, L, L0) == pytest.approx(expected, rel=1e-12)
    # alpha = 1 and L = L0 is plain RoPE
    assert P.ntk_base(1e4, d, 1.0, L0, L0) == pytest.approx(1e4)


def test_registered_rope_type_sets_model_frequencies():
    assert ROPE_INIT_FUNCTIONS[P.ROPE_TYPE] is P.compute_crd_ntk_parameters
    model = tiny_model()
    P.set_crd_ntk_rope(model.config, alpha=4.0, cycle_length=512)
    P.rebuild_rotary(model, model.config)
    d = 8
    base = 1e4 * (4.0 * 512 / 128 - 3.0) ** (d / (d - 2))
    expected = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    # a model built from the config directly (rope type read at construction) agrees
    fresh = LlamaForCausalLM._from_config(model.config, attn_implementation="eager")
    torch.testing.assert_close(fresh.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_alpha_schedule():
    kw = dict(alpha0=16.0, growth=2.0, interval=2000, alpha_max=64.0)
    assert [P.alpha_at_step(s, **kw) for s in (0, 1999, 2000, 3999, 4000, 6000, 10**6)] == [16, 16, 32, 32, 64, 64, 64]


def test_schedule_rebuilds_frequencies_when_alpha_changes():
    model = tiny_model()
    sched = P.CrdNtkSchedule(cycle_length=512, max_shift=1000, alpha0=2.0, growth=2.0, interval=3, alpha_max=8.0, seed=1)
    x = torch.randint(0, 64, (1, 40))
    assert sched.apply(model, model.config, 0)
    out0 = model(x).logits
    assert not sched.apply(model, model.config, 2)  # same alpha: nothing rebuilt
    assert sched.apply(model, model.config, 3)  # alpha 4
    assert model.config.rope_parameters["alpha"] == 4.0
    out1 = model(x).logits
    assert not torch.allclose(out0, out1)
    # equals a model constructed with alpha 4 from the start
    ref = tiny_model()
    P.set_crd_ntk_rope(ref.config, alpha=4.0, cycle_length=512)
    ref = LlamaForCausalLM._from_config(ref.config, attn_implementation="eager").eval()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(ref(x).logits, out1)


def test_shift_is_deterministic_per_seed_and_step():
    shifts = [P.shift_at_step(s, seed=7, max_shift=4 * 2**20) for s in range(50)]
    assert shifts == [P.shift_at_step(s, seed=7, max_shift=4 * 2**20) for s in range(50)]
    assert all(0 <= s < 4 * 2**20 for s in shifts)
    assert len(set(shifts)) > 45  # steps draw different shifts
    assert shifts != [P.shift_at_step(s, seed=8, max_shift=4 * 2**20) for s in range(50)]
    assert {P.shift_at_step(s, seed=0, max_shift=3) for s in range(200)} == {0, 1, 2}


def test_cyclic_positions_wrap():
    pos = P.training_position_ids(2, 10, shift=7, cycle_length=8)
    assert pos.shape == (2, 10)
    assert pos[0].tolist() == [(p + 7) % 8 for p in range(10)]


@pytest.mark.parametrize("T,shards", [(100, 4), (1024, 2), (37, 3)])
def test_shards_get_the_positions_of_the_unsplit_sequence(T, shards):
    sched = P.CrdNtkSchedule(cycle_length=64, max_shift=10**6, alpha0=1.0, growth=2.0, interval=10, alpha_max=4.0,
                             seed=3)
    full = sched.position_ids(2, T, step=5)
    bounds = [round(i * T / shards) for i in range(shards + 1)]
    parts = [sched.position_ids(2, b - a, step=5, start=a) for a, b in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(torch.cat(parts, dim=1), full)


def test_inference_mode_and_plain_export_equivalence():
    model = tiny_model()
    P.set_inference_positions(model, model.config, alpha=P.alpha_for_length(1024, 128), cycle_length=512)
    x = torch.randint(0, 64, (1, 50))
    out = model(x).logits
    plain = P.plain_rope_parameters(model.config)
    assert plain["rope_type"] == "default"
    assert plain["rope_theta"] == pytest.approx(1e4 * (8 * 512 / 128 - 7) ** (8 / 6))
    ref = tiny_model(rope_parameters={"rope_type": "default", "rope_theta": plain["rope_theta"]})
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(ref(x).logits, out)
    with pytest.raises(ValueError, match="alpha"):
        P.set_inference_positions(model, model.config, alpha=0.5, cycle_length=512)
    assert P.alpha_for_length(100, 128) == 1.0 and math.isclose(P.alpha_for_length(1024, 128), 8.0)
