"""Model set-up for evaluation: attention (dense or MS), RoPE scaling, optional peft adapter.

RoPE choices (DESIGN.md, CRD-NTK):
- ``none``: the model's own RoPE.
- ``dynamic``: transformers' "dynamic" rope type (NTK base recomputed from the current length
  whenever it passes the model's ``max_position_embeddings``; ``factor`` is alpha).
- ``crd-ntk``: CRD-NTK inference mode: no wrap, no shift; one static base for the target length L,
  ``b' = b * (alpha * L / L0 - (alpha - 1)) ** (d / (d - 2))`` with L0 the model's context (L is
  taken as at least L0, so short inputs keep the original base; ``rope_length`` fixes L instead). During
  prefill of a window of L tokens this equals "dynamic" with the same factor; it differs while decoding past L
  (fixed base).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds_msattn.config import MODEL_DTYPES

ROPE_MODES = ("none", "dynamic", "crd-ntk")
DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}
ATTENTIONS = ("sdpa", "ms_attention", "eager", "esa_attention")


@dataclass
class EvalModelSpec:
    """What model to evaluate and how."""

    model: str = "smollm2"
    """alias (``smollm2``) or a transformers model directory"""
    adapter: str | None = None
    """peft adapter directory (merged into the weights after loading)"""
    attention: str = "sdpa"
    """``sdpa`` (dense), ``ms_attention``, ``eager`` or ``esa_attention`` (ESA, docs/other_methods.md)"""
    ms_params: dict = field(default_factory=lambda: {"region_size": 16, "top_k": 64, "merge": 16, "sink_regions": 1})
    """MS attention parameters (used when attention is ``ms_attention``)"""
    rope: str = "none"
    """``none``, ``dynamic`` or ``crd-ntk``"""
    rope_factor: float = 4.0
    """NTK alpha for ``dynamic`` and ``crd-ntk``"""
    rope_length: int | None = None
    """``crd-ntk`` only: the target length L of the base (default: each input's own length, at least L0).
    A fixed L gives one base for every input, e.g. the base a CRD-NTK fine-tune trained with."""
    esa_params: dict | None = None
    """``config.esa_attention`` keys (used when attention is ``esa_attention``; unset keys take the defaults)"""
    dtype: str = "float32"
    """``float32`` or ``bfloat16``: the dtype of the model's weights and activations"""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {self.rope!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.rope_factor >= 1.0:
            raise ValueError(f"rope_factor must be >= 1, got {self.rope_factor!r}")
        if self.attention == "esa_attention":
            self.esa_resolved()  # ValueError naming a bad key
        if self.rope_length is not None:
            if self.rope != "crd-ntk":
                raise ValueError(f"rope_length applies to rope 'crd-ntk' only, got rope {self.rope!r}")
            if isinstance(self.rope_length, bool) or not isinstance(self.rope_length, int) or self.rope_length < 1:
                raise ValueError(f"rope_length must be a positive integer (tokens), got {self.rope_length!r}")

    def esa_resolved(self) -> dict:
        """The ESA parameters the model runs with: ``esa_params`` over the defaults, validated."""
        from types import SimpleNamespace

        from ds_msattn.hf_esa import esa_attention_params

        return esa_attention_params(SimpleNamespace(esa_attention=dict(self.esa_params or {})))

    def describe(self) -> str:
        attn = self.attention
        if attn == "esa_attention":
            p = self.esa_resolved()
            w = f",w={p['local_window'] if p['far_distance'] is None else p['far_distance']}" if p["far_positions"] == "fixed" else ""
            proj = f",proj={p['projections']}" + (f",r={p['rank']}" if p["rank"] else "") if p["projections"] else ""
            attn += (f"(k={p['top_k']},I={p['sink_tokens']},L={p['local_window']},C={p['chunk_size']},"
                     f"eps={p['proximity']},{p['select_per']},{p['far_positions']}{w}{proj})")
        if attn == "ms_attention":
            from ds_msattn.attention.options import MODEL_OPTIONS

            p = {**MODEL_OPTIONS, **self.ms_params}  # what the model runs: unset options take the model defaults
            shown = ["far_positions"] + {"capped": ["far_window"], "grouped": ["far_window", "far_group"]}.get(
                p["far_positions"], []) + ["score", "select_per"]
            opts = "".join(f",{key}={p[key]}" for key in shown)
            attn += f"(c={p['region_size']},K={p['top_k']},m={p['merge']},s={p.get('sink_regions', 1)}{opts})"
        rope = self.rope if self.rope == "none" else f"{self.rope}(alpha={self.rope_factor:g})"
        if self.rope_length is not None:
            rope = rope[:-1] + f",L={self.rope_length})"
        return (f"{attn}, rope {rope}" + (f", adapter {self.adapter}" if self.adapter else "")
                + (f", {self.dtype}" if self.dtype != "float32" else ""))


DENSE_GPU = "sdpa_repeat_kv"


def _dense_repeat_kv(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Dense causal SDPA with the KV heads repeated: on CUDA in fp32 this runs the memory-efficient kernel.

    (transformers' "sdpa" passes ``enable_gqa``, which that kernel lacks, and falls back to the math kernel,
    whose fp32 ``[Hq, T, T]`` scores do not fit at 32K.) Query ``[B, Hq, T, D]`` -> ``([B, T, Hq, D], None)``.
    """
    Lq, Lk = query.shape[2], key.shape[2]
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("sdpa_repeat_kv does not support padded batches")
    if Lq != Lk and Lq != 1:
        raise ValueError(f"sdpa_repeat_kv decodes one token at a time (got {Lq} queries for {Lk} keys)")
    G = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=Lq == Lk and Lq > 1, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_dense_gpu() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(DENSE_GPU, _dense_repeat_kv)
    AttentionMaskInterface.register(DENSE_GPU, flash_attention_mask)


def ntk_base(base: float, head_dim: int, length: int, original: int, alpha: float) -> float:
    """CRD-NTK inference base (DESIGN.md) for a target ``length``; lengths below ``original`` keep ``base``."""
    length = max(length, original)
    return base * (alpha * length / original - (alpha - 1)) ** (head_dim / (head_dim - 2))


def load_eval_model(spec: EvalModelSpec, config_overrides: dict | None = None, device: str = "cpu"):
    """The model in eval mode, in ``spec.dtype``, on ``device``, with attention, RoPE mode and adapter applied.

    Dense attention on CUDA uses :func:`_dense_repeat_kv` (same maths as "sdpa", a kernel that fits).
    """
    from ds_msattn.models import load_model, resolve_model
    from transformers import AutoConfig

    overrides = dict(config_overrides or {})
    if spec.rope == "dynamic":
        cfg = AutoConfig.from_pretrained(resolve_model(spec.model))
        rope = dict(cfg.rope_parameters)
        rope.update(rope_type="dynamic", factor=float(spec.rope_factor))
        overrides["rope_parameters"] = rope
    ms = spec.ms_params if spec.attention == "ms_attention" else None
    if spec.attention == "esa_attention":
        overrides["esa_attention"] = dict(spec.esa_params or {})
    attention = spec.attention
    if attention == "sdpa" and str(device).startswith("cuda"):
        _register_dense_gpu()
        attention = DENSE_GPU
    model = load_model(spec.model, attn_implementation=attention, ms_attention=ms, dtype=DTYPES[spec.dtype], **overrides)
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    return model.eval().to(device)


def prepare_length(model, spec: EvalModelSpec, length: int) -> None:
    """Set the static CRD-NTK base for inputs of ``length`` tokens (no-op for other RoPE modes).

    Uses the training engineer's rope type (``ds_msattn.positions``: inference mode, cycle length
    ``max(length, L0)``); :func:`ntk_base` is the same formula written out, which the tests compare.
    """
    if spec.rope != "crd-ntk":
        return
    from ds_msattn.positions import set_inference_positions

    cfg = model.config
    original = int((cfg.rope_parameters or {}).get("original_max_position_embeddings") or cfg.max_position_embeddings)
    target = spec.rope_length if spec.rope_length is not None else max(length, original)
    set_inference_positions(model, cfg, alpha=spec.rope_factor, cycle_length=target)
