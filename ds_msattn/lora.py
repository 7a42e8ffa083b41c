"""Reduced LongLoRA through peft: LoRA on k_proj and o_proj, plus fully trained embeddings and norms.

Why only k and o (DESIGN.md): QK^T = X Wq Wk^T X^T, so adapting Wk can absorb a change of Wq (Wq full
rank); the output is linear in Wv Wo, so Wo can absorb a change of Wv. Targets are configurable (the
paper used q/o for Mistral).

`modules_to_save=["embed_tokens", "norm"]`: peft matches names by suffix, so "norm" wraps *every*
norm layer (input_layernorm, post_attention_layernorm and the final model.norm), which is what
LongLoRA trains; write "model.norm" to train only the final one. With tied input/output embeddings
(SmolLM2) peft's `ensure_weight_tying` makes the trained embedding the output projection as well.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from .positions import ROPE_TYPE, plain_rope_parameters

DEFAULT_TARGETS = ("k_proj", "o_proj")
DEFAULT_MODULES_TO_SAVE = ("embed_tokens", "norm")


def reduced_lora_config(*, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules=DEFAULT_TARGETS,
                        modules_to_save=DEFAULT_MODULES_TO_SAVE, tied_embeddings: bool = False) -> LoraConfig:
    """The peft LoraConfig of reduced LongLoRA (DESIGN.md defaults)."""
    if r <= 0:
        raise ValueError(f"r must be > 0, got {r}")
    if not target_modules:
        raise ValueError("target_modules must name at least one module, e.g. ['k_proj', 'o_proj']")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      modules_to_save=list(modules_to_save) or None, bias="none", task_type="CAUSAL_LM",
                      # tied input/output embeddings: the trained embedding copy is also the output projection
                      ensure_weight_tying=tied_embeddings)


def apply_reduced_lora(model: torch.nn.Module, settings=None, **kwargs) -> PeftModel:
    """Wrap `model` with peft LoRA. `settings` is a `ds_msattn.config.LoraSettings` (or pass keywords)."""
    if settings is not None:
        kwargs = dict(r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                      target_modules=settings.target_modules, modules_to_save=settings.modules_to_save)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    cfg = reduced_lora_config(**kwargs, tied_embeddings=tied)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t.rsplit(".", 1)[-1] not in names]
    if missing:
        raise ValueError(f"lora.target_modules {missing} match no module of the model (linear layers: "
                         f"{sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))[:8]} ...)")
    return get_peft_model(model, cfg)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 partitioned parameters report their full size)."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())
    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def save_adapter(model: PeftModel, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """peft's adapter files (adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(str(out_dir), state_dict=state_dict)


def plain_config(config):
    """A copy of `config` that plain transformers can load: crd_ntk RoPE -> equivalent default RoPE, sdpa."""
    config = copy.deepcopy(config)
    if (config.rope_parameters or {}).get("rope_type") == ROPE_TYPE:
        config.rope_parameters = plain_rope_parameters(config)
    config._attn_implementation = "sdpa"
    return config


def merge_for_export(model: PeftModel) -> torch.nn.Module:
    """Merge the adapters into full weights (in place) and return the plain transformers model."""
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged.config = plain_config(merged.config)
    return merged


def export_merged(model: torch.nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a merged model (safetensors + config.json) that `AutoModelForCausalLM.from_pretrained` loads as is."""
    out_dir = Path(out_dir)
    merged = merge_for_export(model)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
