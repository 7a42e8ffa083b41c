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

The options that rotate (``far_positions`` other than exact, ``score="position_free"``) need the model's rotary
frequencies and the positions q and k were rotated with. The positions are the ``position_ids`` transformers hands
to the attention function (``arange`` when absent); the frequencies come from the model's rope parameters through
transformers' own ``ROPE_INIT_FUNCTIONS`` (:func:`rope_frequencies`): default, crd_ntk and dynamic alike. For
"dynamic" they are those of the current input's length (``max(position_ids) + 1``), which is what the model's rotary
embedding holds whenever inputs come in non-decreasing length (transformers keeps the largest length seen).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .attention import ms_attention
from .attention.options import MODEL_OPTIONS, make_options

NAME = "ms_attention"

#: Defaults when ``config.ms_attention`` is absent or partial: 1024 keys per query, region 0 as a sink.
DEFAULT_MS_ATTENTION = {
    "region_size": 16, "top_k": 64, "merge": 16, "sink_regions": 1, "backend": "auto", **MODEL_OPTIONS,
}
OPTION_KEYS = tuple(MODEL_OPTIONS)

_override: Callable | None = None
_probe: Callable | None = None


def set_attention_probe(fn: Callable | None) -> None:
    """Call ``fn(module, query, key, params)`` before every ms_attention call (diagnostics; ``None`` removes it).

    ``params`` are the resolved MS parameters of the call (options, ``rope_inv_freq`` and ``position_ids`` of the
    keys when an option rotates); the probe must not change the tensors.
    """
    global _probe
    _probe = fn


def set_attention_override(fn: Callable | None) -> None:
    """Route the registered attention through ``fn(module, q, k, v, params, **kwargs) -> o [B, Hq, T, Dv]``.

    Used by sequence parallelism (the local shard's attention needs the process group); ``None`` restores the
    single-process path.
    """
    global _override
    _override = fn


def config_section(config, name: str, defaults: dict) -> dict:
    """``config.<name>`` (a dict, or absent) merged over ``defaults``; a non-dict or unknown keys raise ValueError."""
    given = getattr(config, name, None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"config.{name} must be a dict, got {type(given).__name__}")
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"config.{name} has unknown keys {sorted(unknown)}; allowed: {sorted(defaults)}")
    return {**defaults, **given}


def ms_attention_params(config) -> dict:
    """``config.ms_attention`` merged over :data:`DEFAULT_MS_ATTENTION`; unknown keys raise ValueError."""
    params = config_section(config, "ms_attention", DEFAULT_MS_ATTENTION)
    make_options(**{key: params[key] for key in OPTION_KEYS})  # ValueError naming a bad option key
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_frequencies(config, position_ids: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """The model's rotary ``inv_freq [D/2]`` (fp32) for an input whose positions are ``position_ids`` (or arange(T)).

    Computed from ``config.rope_parameters`` with transformers' ``ROPE_INIT_FUNCTIONS`` (the plain formula for
    "default"); "dynamic" types get the current length, as transformers' dynamic update computes it.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        d = int(_head_dim(config) * params.get("partial_rotary_factor", 1.0))
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d))
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"ms_attention options that rotate keys need a known rope type, got {rope_type!r}")
    kwargs = {}
    if "dynamic" in rope_type:
        kwargs["seq_len"] = int(position_ids.max()) + 1 if position_ids is not None else T
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device, **kwargs)
    return inv_freq.float()


def _rotary_kwargs(config, params: dict, position_ids: torch.Tensor | None, query: torch.Tensor, Tk: int) -> dict:
    """``rope_inv_freq`` and ``position_ids`` of the keys for :func:`ms_attention` / decode, when an option rotates."""
    if not make_options(**{key: params[key] for key in OPTION_KEYS}).needs_rotary:
        return {}
    Tq = query.shape[2]
    if position_ids is None:
        keys = torch.arange(Tk, device=query.device)[None]
    else:
        position_ids = position_ids.to(query.device).view(-1, position_ids.shape[-1])
        # While decoding only the new tokens' positions arrive; the cached keys precede them one by one.
        keys = position_ids if Tq == Tk else position_ids[:, :1] - (Tk - Tq) + torch.arange(Tk, device=query.device)
    return {"rope_inv_freq": rope_frequencies(config, keys, Tk, query.device), "position_ids": keys}


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
    params.update(_rotary_kwargs(module.config, params, kwargs.get("position_ids"), query, Tk))
    if _probe is not None:
        _probe(module, query, key, params)
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
                    row_params = dict(params)
                    if "position_ids" in params:
                        row_params["position_ids"] = params["position_ids"].expand(len(lengths), -1)[b, :n]
                    out[rows] = ms_attention(query[rows], key[rows], value[rows], backend=backend, **row_params)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, ms_attention_forward)
AttentionMaskInterface.register(NAME, flash_attention_mask)

from . import hf_shifted  # noqa: E402,F401  (registers "s2_attention" and "sf_attention": ds_msattn/hf_shifted.py)
from . import hf_esa  # noqa: E402,F401  (registers "esa_attention": ds_msattn/hf_esa.py)
