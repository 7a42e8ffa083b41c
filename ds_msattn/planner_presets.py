"""Model shapes for the memory planner: built-in presets and shapes read from transformers configs.

A :class:`ModelShape` holds only what memory depends on: widths, depths, head counts, vocabulary, whether the
output head shares the embedding, and whether q/k/v carry biases (Qwen2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """Decoder-only transformer shape (Llama family: RMSNorm, rotary positions, gated SiLU MLP)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self):
        for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, gated MLP and two RMSNorm weights."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate_size + 2 * h

    def total_params(self) -> int:
        """All parameters, a tied output head counted once (as DeepSpeed's ``model_to_params`` does)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else embed
        return embed + head + self.num_layers * self.layer_params() + self.hidden_size

    def largest_module_params(self) -> int:
        """Largest single module's parameters (DeepSpeed's ``largest_layer_params`` for ZeRO-3)."""
        h = self.hidden_size
        return max(self.vocab_size * h, h * self.intermediate_size, h * self.num_heads * self.head_dim)


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("llama2-7b", 4096, 11008, 32, 32, 32, 128, 32000),
        ModelShape("llama2-13b", 5120, 13824, 40, 40, 40, 128, 32000),
        ModelShape("mistral-7b", 4096, 14336, 32, 32, 8, 128, 32000),
        ModelShape("llama3-8b", 4096, 14336, 32, 32, 8, 128, 128256),
        ModelShape("qwen2-7b", 3584, 18944, 28, 28, 4, 128, 152064, qkv_bias=True),
        ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 64, 49152, tie_embeddings=True),
    )
}


def shape_from_config(config, name: str = "config") -> ModelShape:
    """Shape of a transformers config object or a config.json dict (Llama, Mistral, Qwen2 keys)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    h = get("hidden_size")
    heads = get("num_attention_heads")
    if h is None or heads is None or get("num_hidden_layers") is None:
        raise ValueError(f"{name}: needs hidden_size, num_attention_heads and num_hidden_layers (a decoder config)")
    model_type = get("model_type", "") or ""
    return ModelShape(
        name=name,
        hidden_size=int(h),
        intermediate_size=int(get("intermediate_size") or 4 * h),
        num_layers=int(get("num_hidden_layers")),
        num_heads=int(heads),
        num_kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or h // heads),
        vocab_size=int(get("vocab_size")),
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=bool(get("attention_bias", False)) or model_type.startswith("qwen2"),
    )


def resolve_shape(model: str | os.PathLike) -> ModelShape:
    """A preset name, a directory holding config.json, or a config.json path -> :class:`ModelShape`."""
    key = str(model).lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return shape_from_config(json.loads(path.read_text()), name=str(model))
    if key == "smollm2":
        return PRESETS["smollm2-135m"]
    raise ValueError(f"model must be one of {sorted(PRESETS)}, a directory with config.json or a config.json path; got {model!r}")
