"""Reduced LongLoRA: targets, trainable set, and a merged export that loads in plain transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ds_msattn import lora, positions


def tiny_model(tie=False):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def _short(names):
    return sorted(n.replace("base_model.model.", "") for n in names)


def test_default_trainable_set_is_k_o_lora_embeddings_and_every_norm():
    model = lora.apply_reduced_lora(tiny_model())
    expected = ["model.embed_tokens.modules_to_save.default.weight", "model.norm.modules_to_save.default.weight"]
    for i in range(2):
        expected += [f"model.layers.{i}.self_attn.{p}.lora_{ab}.default.weight" for p in ("k_proj", "o_proj")
                     for ab in "AB"]
        expected += [f"model.layers.{i}.{n}.modules_to_save.default.weight"
                     for n in ("input_layernorm", "post_attention_layernorm")]
    assert _short(lora.trainable_parameter_names(model)) == sorted(expected)
    trainable, total = lora.count_parameters(model)
    assert 0 < trainable < total


def test_configurable_targets_and_final_norm_only():
    model = lora.apply_reduced_lora(tiny_model(), target_modules=["q_proj", "o_proj"], modules_to_save=["model.norm"])
    names = _short(lora.trainable_parameter_names(model))
    assert any("q_proj.lora_A" in n for n in names) and not any("k_proj" in n for n in names)
    assert [n for n in names if "modules_to_save" in n] == ["model.norm.modules_to_save.default.weight"]


def test_bad_targets_name_the_key():
    with pytest.raises(ValueError, match="target_modules"):
        lora.apply_reduced_lora(tiny_model(), target_modules=["not_a_layer"])
    with pytest.raises(ValueError, match="target_modules"):
        lora.apply_reduced_lora(tiny_model(), target_modules=[])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_merged_export_loads_in_plain_transformers_and_matches(tmp_path, tie):
    base = tiny_model(tie)
    positions.set_inference_positions(base, base.config, alpha=4.0, cycle_length=512)
    model = lora.apply_reduced_lora(base)
    torch.manual_seed(1)
    with torch.no_grad():  # make every trainable part differ from the base model
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        expected = model(x).logits
    lora.export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.rope_parameters["rope_type"] == "default"
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, expected, rtol=1e-4, atol=1e-4)
