"""transformers integration of S2-Attn and SF-Attn: ``attn_implementation="s2_attention"`` / ``"sf_attention"``.

Registered with ``AttentionInterface`` and ``AttentionMaskInterface`` (the FlashAttention mask function: a 2D padding
mask or None) when :mod:`ds_msattn.hf` is imported; no model code is patched. Parameters come from
``config.shifted_attention`` (a dict saved in config.json; ``ds-msattn train`` fills it from ``attention.shifted``);
missing keys take :data:`DEFAULT_SHIFTED_ATTENTION`, where ``wrap`` and ``sink_tokens`` left None take the
method's own defaults (:data:`METHOD_DEFAULTS`).

Both are training attentions, as LongLoRA intends: with the module in eval mode (``model.eval()``), or while
decoding with a KV cache, they compute dense causal attention unless ``eval_dense`` is false. Padded batches raise
ValueError in the sparse path (training batches here are full rows). The group layout is over the order of the
tokens in the row, so cyclic (wrapped) ``position_ids`` of CRD-NTK change nothing here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .attention.s2 import DEFAULT_GROUP_RATIO, check_shifted_params, shifted_sparse_attention
from .attention.sf import DEFAULT_SINK_TOKENS

DEFAULT_SHIFTED_ATTENTION = {
    "group_size": None, "group_ratio": DEFAULT_GROUP_RATIO, "shift": None, "wrap": None, "sink_tokens": None,
    "eval_dense": True,
}
#: What ``wrap`` and ``sink_tokens`` left None mean for each implementation.
METHOD_DEFAULTS = {
    "s2_attention": {"wrap": True, "sink_tokens": 0},
    "sf_attention": {"wrap": False, "sink_tokens": DEFAULT_SINK_TOKENS},
}


def shifted_attention_params(config, name: str) -> dict:
    """``config.shifted_attention`` over the defaults of implementation ``name``; bad keys/values raise ValueError."""
    given = getattr(config, "shifted_attention", None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"config.shifted_attention must be a dict, got {type(given).__name__}")
    unknown = set(given) - set(DEFAULT_SHIFTED_ATTENTION)
    if unknown:
        raise ValueError(f"config.shifted_attention has unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(DEFAULT_SHIFTED_ATTENTION)}")
    params = {**DEFAULT_SHIFTED_ATTENTION, **given}
    for key, value in METHOD_DEFAULTS[name].items():
        if params[key] is None:
            params[key] = value
    try:
        check_shifted_params(params["group_size"], params["group_ratio"], params["shift"], params["sink_tokens"])
    except ValueError as e:
        raise ValueError(f"{name}: config.shifted_attention.{e}") from None
    return params


def _dense_causal(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """Dense causal attention (the last Tq of Tk keys are the queries' own), padding keys masked -> [B, Hq, Tq, Dv]."""
    Tq, Tk = query.shape[2], key.shape[2]
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    if attention_mask is None or bool(attention_mask.bool().all()):
        if Tq == Tk:
            return F.scaled_dot_product_attention(query, key, value, is_causal=Tq > 1, scale=scaling)
        allowed = None
    else:
        allowed = attention_mask[:, None, None, -Tk:].bool()  # [B, 1, 1, Tk]
    causal = torch.arange(Tk, device=query.device)[None, :] <= torch.arange(Tk - Tq, Tk, device=query.device)[:, None]
    mask = causal if allowed is None else causal & allowed
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def _make_forward(name: str):
    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """Query ``[B, Hq, T, D]`` -> ``([B, T, Hq, Dv], None)``."""
        if dropout:
            raise ValueError(f"{name} does not implement attention dropout; set attention_dropout=0 (got {dropout})")
        params = shifted_attention_params(module.config, name)
        sparse = query.shape[2] == key.shape[2] and (module.training or not params["eval_dense"])
        if not sparse:
            out = _dense_causal(query, key, value, attention_mask, scaling)
        else:
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError(f"{name} does not support padded batches in training (attention_mask has zeros)")
            out = shifted_sparse_attention(
                query, key, value, group_size=params["group_size"], group_ratio=params["group_ratio"],
                shift=params["shift"], wrap=params["wrap"], sink_tokens=params["sink_tokens"], scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    forward.__name__ = f"{name}_forward"
    return forward


s2_attention_forward = _make_forward("s2_attention")
sf_attention_forward = _make_forward("sf_attention")

for _name, _fn in (("s2_attention", s2_attention_forward), ("sf_attention", sf_attention_forward)):
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, flash_attention_mask)
