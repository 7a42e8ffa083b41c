"""transformers integration: ``attn_implementation="ms_attention"`` through the registration points.

Importing this module registers the attention function with ``AttentionInterface`` and a mask function with
``AttentionMaskInterface`` (transformers' FlashAttention one: it hands over the 2D padding mask, or None, instead
of a ``[B, 1, T, T]`` mask that would not fit at long T). No model code is patched.

Parameters come from ``config.ms_attention`` (a dict saved in config.json); missing keys take
:data:`DEFAULT_MS_ATTENTION`. Padding and packing are never silently wrong:

- right padding (a 2D ``attention_mask``) is handled exactly: every row is attended at its own length;
  left padding raises ValueError;
- packed sequences (``position_ids`` that restart inside a row) raise ValueError, unless the caller passes
  ``positions_wrapped=True`` (CRD-NTK's cyclic training positions restart by design on one sequence);
- decoding with a KV cache (fewer queries than keys) goes to :func:`ds_msattn.attention.decode.ms_attention_decode`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .attention import ms_attention

NAME = "ms_attention"

#: Defaults when ``config.ms_attention`` is absent or partial: 1024 keys per query, region 0 as a sink.
DEFAULT_MS_ATTENTION = {"region_size": 16, "top_k": 64, "merge": 16, "sink_regions": 1, "backend": "auto"}

_override: Callable | None = None


def set_attention_override(fn: Callable | None) -> None:
    """Route the registered attention through ``fn(module, q, k, v, params, **kwargs) -> o [B, Hq, T, Dv]``.

    Used by sequence parallelism (the local shard's attention needs the process group); ``None`` restores the
    single-process path.
    """
    global _override
    _override = fn


def ms_attention_params(config) -> dict:
    """``config.ms_attention`` merged over :data:`DEFAULT_MS_ATTENTION`; unknown keys raise ValueError."""
    given = getattr(config, "ms_attention", None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"config.ms_attention must be a dict, got {type(given).__name__}")
    unknown = set(given) - set(DEFAULT_MS_ATTENTION)
    if unknown:
        raise ValueError(f"config.ms_attention has unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULT_MS_ATTENTION)}")
    return {**DEFAULT_MS_ATTENTION, **given}


def _check_positions(position_ids: torch.Tensor | None, wrapped: bool) -> None:
    if position_ids is None or wrapped or position_ids.shape[-1] < 2:
        return
    steps = position_ids[..., 1:] - position_ids[..., :-1]
    if bool((steps != 1).any()):
        raise ValueError(
            "ms_attention got position_ids that restart inside a row (packed sequences): not supported. "
            "Put one sequence per row (right padding with attention_mask is fine), or pass positions_wrapped=True "
            "when the restarts are cyclic positions of a single sequence (CRD-NTK)."
        )


def _padded_lengths(attention_mask: torch.Tensor, T: int) -> torch.Tensor | None:
    """Per-row lengths of a right-padded 2D mask, None when nothing is padded; left padding raises."""
    mask = attention_mask[:, -T:].bool()
    if bool(mask.all()):
        return None
    lengths = mask.sum(-1)
    right = torch.arange(T, device=mask.device)[None, :] < lengths[:, None]
    if not bool((right == mask).all()):
        raise ValueError(
            "ms_attention supports right padding only (attention_mask must be 1s then 0s in every row); "
            "use tokenizer.padding_side='right'."
        )
    return lengths


def ms_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function registered as "ms_attention": query ``[B, Hq, T, D]`` -> ``([B, T, Hq, Dv], None)``."""
    if dropout:
        raise ValueError(f"ms_attention does not implement attention dropout; set attention_dropout=0 (got {dropout})")
    params = ms_attention_params(module.config)
    backend = params.pop("backend")
    params["scale"] = scaling
    Tq, Tk = query.shape[2], key.shape[2]
    _check_positions(kwargs.get("position_ids"), bool(kwargs.get("positions_wrapped", False)))
    if _override is not None:
        out = _override(module, query, key, value, params, attention_mask=attention_mask, **kwargs)
    elif Tq != Tk:
        if attention_mask is not None and _padded_lengths(attention_mask, Tk) is not None:
            raise ValueError("ms_attention decoding with a KV cache does not support padded batches")
        from .attention.decode import ms_attention_decode

        out = ms_attention_decode(query, key, value, **params)
    else:
        lengths = None if attention_mask is None else _padded_lengths(attention_mask, Tk)
        if lengths is None:
            out = ms_attention(query, key, value, backend=backend, **params)
        else:
            out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=query.dtype, device=query.device)
            for b, n in enumerate(lengths.tolist()):
                if n:
                    rows = slice(b, b + 1), slice(None), slice(0, n)
                    out[rows] = ms_attention(query[rows], key[rows], value[rows], backend=backend, **params)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, ms_attention_forward)
AttentionMaskInterface.register(NAME, flash_attention_mask)
