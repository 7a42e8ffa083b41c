"""transformers integration of ESA (arXiv 2502.14477): ``attn_implementation="esa_attention"``.

Registered with ``AttentionInterface`` and ``AttentionMaskInterface`` (the FlashAttention mask function: a 2D padding
mask or None) when :mod:`ds_msattn.hf` is imported; no model code is patched. Parameters come from
``config.esa_attention`` (a dict saved in config.json; ``ds-msattn eval --attn esa_attention`` fills it from its
``--esa-*`` flags); missing keys take :data:`DEFAULT_ESA_ATTENTION`:

- ``top_k``, ``sink_tokens``, ``local_window``, ``chunk_size``, ``proximity``, ``select_per``, ``far_positions``,
  ``far_distance``: as :func:`ds_msattn.attention.esa.esa_attention`;
- ``projections``: directory of ``ds-msattn esa-calibrate``'s output (None: full-dimensional scores);
  ``rank``: use the first ``rank`` columns of the calibrated projections (None: all).

ESA is an inference method: it works the same in train and eval mode and while decoding with a KV cache (a decoding
step is a chunk of one query). Padded batches raise ValueError; the keys' positions are the ``position_ids`` handed
to the attention (``arange`` when absent), as for ``ms_attention``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .attention.esa import DEFAULT_ESA, esa_attention, make_params

NAME = "esa_attention"
DEFAULT_ESA_ATTENTION = {**DEFAULT_ESA, "projections": None, "rank": None}


def esa_attention_params(config) -> dict:
    """``config.esa_attention`` over :data:`DEFAULT_ESA_ATTENTION`; bad keys or values raise ValueError naming them."""
    from .hf import config_section  # hf imports this module last, to register it

    params = config_section(config, "esa_attention", DEFAULT_ESA_ATTENTION)
    try:
        make_params(**{key: params[key] for key in DEFAULT_ESA})
        rank = params["rank"]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be an integer >= 1 or None, got {rank!r}")
        if rank is not None and params["projections"] is None:
            raise ValueError("rank needs projections (the directory of ds-msattn esa-calibrate's output)")
        if params["projections"] is not None and not isinstance(params["projections"], str):
            raise ValueError(f"projections must be a directory path or None, got {params['projections']!r}")
    except ValueError as e:
        raise ValueError(f"config.esa_attention.{e}") from None
    return params


def layer_projection(config, params: dict, layer_idx: int, n_kv: int, head_dim: int):
    """The (query, key) projections of one layer from ``params["projections"]``, checked against the model and the
    attention's parameters (None without projections)."""
    if params["projections"] is None:
        return None
    from .attention.esa_calibrate import load_projections

    proj = load_projections(params["projections"])
    meta = proj.meta
    esa = make_params(**{key: params[key] for key in DEFAULT_ESA})
    want = {"select_per": esa.select_per, "far_positions": esa.far_positions,
            "far_distance": esa.distance if esa.far_positions == "fixed" else None,
            "num_layers": config.num_hidden_layers, "num_key_value_heads": n_kv, "head_dim": head_dim}
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(f"esa_attention: the projections in {params['projections']} were calibrated with "
                             f"{key}={meta.get(key)!r}, this model/attention has {key}={value!r} (recalibrate: "
                             f"ds-msattn esa-calibrate)")
    try:
        return proj.layer(layer_idx, params["rank"])
    except ValueError as e:
        raise ValueError(f"config.esa_attention.{e}") from None


def esa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """The function registered as "esa_attention": query ``[B, Hq, Tq, D]`` -> ``([B, Tq, Hq, Dv], None)``."""
    if dropout:
        raise ValueError(f"esa_attention does not implement attention dropout; set attention_dropout=0 (got {dropout})")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("esa_attention does not support padded batches (attention_mask has zeros)")
    config = module.config
    params = esa_attention_params(config)
    Tk = key.shape[2]
    rotary = {}
    if params["far_positions"] == "fixed":
        from .attention.options import MODEL_OPTIONS
        from .hf import _rotary_kwargs

        # ms_attention's rule for the keys' positions and the model's frequencies (its options that rotate)
        rotary = _rotary_kwargs(config, {**MODEL_OPTIONS, "score": "position_free"}, kwargs.get("position_ids"),
                                query, Tk)
    projection = layer_projection(config, params, module.layer_idx, key.shape[1], query.shape[-1])
    out = esa_attention(query, key, value, **{k: params[k] for k in DEFAULT_ESA}, projection=projection,
                        scale=scaling, **rotary)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, esa_attention_forward)
AttentionMaskInterface.register(NAME, flash_attention_mask)
