"""``ms_attention``: input validation and backend dispatch."""

from __future__ import annotations

import torch

from .options import KeyMover, check_rotary, make_options
from .reference import ms_attention_reference
from .selection import _validate_params, select_regions
from .torch_path import ms_attention_torch

BACKENDS = ("auto", "reference", "torch", "triton")


def _validate_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, T, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point (float32, bfloat16 or float16), got {x.dtype}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != T or v.shape[2] != T:
        raise ValueError(f"sequence lengths differ: q {T}, k {k.shape[2]}, v {v.shape[2]} (self-attention needs one T)")
    if k.shape[3] != D:
        raise ValueError(f"k head dim must equal q head dim {D}, got {k.shape[3]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have as many heads as k ({k.shape[1]}), got {v.shape[1]}")
    if k.shape[1] < 1 or Hq % k.shape[1] != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({k.shape[1]}): Hq % Hkv == 0")
    if T < 1 or D < 1 or B < 1:
        raise ValueError(f"q must have non-empty batch, length and head dim, got shape {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def ms_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    region_size: int,
    top_k: int,
    merge: int,
    sink_regions: int = 1,
    scale: float | None = None,
    backend: str = "auto",
    far_positions: str | None = None,
    far_window: int | None = None,
    far_group: int | None = None,
    score: str | None = None,
    select_per: str | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Correlation-aware select-and-merge attention (DESIGN.md), causal.

    Args:
        q: ``[B, Hq, T, D]`` queries, RoPE applied.
        k: ``[B, Hkv, T, D]`` keys, ``Hq % Hkv == 0`` (query head h reads kv head ``h // (Hq // Hkv)``).
        v: ``[B, Hkv, T, Dv]`` values.
        region_size: tokens per region (c).
        top_k: regions attended per query block, its own block included (K).
        merge: query regions merged into one block (m), ``1 <= m <= K``.
        sink_regions: leading regions always selected (s >= 0).
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"reference"`` (float64 oracle), ``"torch"`` (fast PyTorch path), ``"triton"``
            (fused GPU kernels) or ``"auto"`` (Triton for CUDA tensors when available, else torch).
        far_positions: ``"exact"`` (default) | ``"compact"`` | ``"capped"`` | ``"grouped"``: where the keys of
            selected history regions sit for RoPE (docs/design.md); ``far_window`` W and ``far_group`` G.
        score: ``"rope"`` (default) | ``"position_free"``: region summaries of the rotated q, k or of q, k
            with their rotation undone.
        select_per: ``"head"`` (default) | ``"kv_group"``: one selection per query head or per kv head.
        rope_inv_freq: ``[D/2]`` rotary frequencies of the model (transformers' rotate_half convention);
            required by every option value that rotates.
        position_ids: ``[T]`` or ``[B, T]`` positions q and k were rotated with (default ``arange(T)``).

    Returns:
        ``o [B, Hq, T, Dv]`` in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _validate_params(region_size, top_k, merge, sink_regions)
    _validate_tensors(q, k, v)
    options = make_options(
        far_positions=far_positions, far_window=far_window, far_group=far_group, score=score, select_per=select_per
    )
    B, _, T, D = q.shape
    inv_freq, positions = check_rotary(options, rope_inv_freq, position_ids, B=B, T=T, D=D)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    params = dict(region_size=region_size, top_k=top_k, merge=merge, sink_regions=sink_regions)
    rotary = dict(options=options, rope_inv_freq=inv_freq, positions=positions)
    if backend == "reference":
        return ms_attention_reference(q, k, v, scale=scale, **params, **rotary)
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "torch"
    if backend == "triton" and q.is_cuda:  # the fused selection kernel (kernels/select.py); same sel
        sel = _triton_selection(q, k, **params, **rotary)
    else:
        sel = select_regions(q, k, **params, **rotary)
    mover = KeyMover(options, inv_freq.to(q.device), region_size, merge, max_shift=T) if options.moves_keys else None
    if backend == "triton":
        return _triton_attention(q, k, v, sel, region_size=region_size, merge=merge, scale=float(scale), mover=mover)
    return ms_attention_torch(q, k, v, sel, region_size=region_size, merge=merge, scale=float(scale), mover=mover)


def _triton_available() -> bool:
    try:
        from ds_msattn.kernels import ms_attention_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_selection(q, k, **kwargs):
    try:
        from ds_msattn.kernels.select import select_regions_triton
    except ImportError as e:
        raise NotImplementedError(f"backend='triton' is not available: {e}") from e
    return select_regions_triton(q, k, **kwargs)


def _triton_attention(q, k, v, sel, *, region_size, merge, scale, mover=None):
    try:
        from ds_msattn.kernels import ms_attention_triton
    except ImportError as e:
        raise NotImplementedError(f"backend='triton' is not available: {e}") from e
    return ms_attention_triton(q, k, v, sel, region_size=region_size, merge=merge, scale=scale, mover=mover)
