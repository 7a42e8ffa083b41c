"""ESA, Efficient Selective Attention (Wang et al., arXiv 2502.14477, "Unshackling Context Length: An Efficient
Selective Attention Approach through Query-Key Compression"), fast torch path. An inference method: no training.

Tensors as for ``scaled_dot_product_attention``: q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]``
with RoPE applied, ``Hq % Hkv == 0`` and ``Tq <= Tk`` (the queries are the last Tq tokens: a prefill when
``Tq == Tk``, a decoding step with a KV cache otherwise); output ``[B, Hq, Tq, Dv]`` in q's dtype.

The rule, followed from the paper (section 3, appendix G and table 8; its code was not found, so the choices where
the text is silent are listed in docs/other_methods.md, "ESA"):

- **Chunks.** The queries are read in chunks C of ``chunk_size`` tokens (the paper's chunked prefill; a decoding
  step is a chunk of one). For a chunk starting at token a, the preceding tokens ``[0, a)`` are the *initial*
  tokens I ``[0, sink_tokens)``, the *local* tokens L (the ``local_window`` tokens before a, after I) and the
  *middle* tokens M between them. The chunk attends to I, to the top-k selected middle tokens M_k, to L and to
  itself causally (the paper's equation 1), all in one softmax.
- **Importance score** (equations 3 and 4). For a query c and a middle token m, ``f(m; c) = sum_h q_{h,c} . k_{h,m}``
  over every query head h of the layer (k_{h,m} the key of h's kv head), so that one selection serves all heads
  (``select_per="layer"``, the paper's rule, "uniform" in its table 8); ``select_per="kv_group"`` sums over the
  query heads of one kv head only and selects per kv head. Each query's scores are shifted by their maximum over M,
  then the chunk's score of m is the maximum over its queries: ``F(m; C) = max_c (f(m; c) - max_m' f(m'; c))``.
- **Query-key compression** (equations 5 to 7). The scores come from low-dimensional surrogates: the query vector
  (the sum of the group's query heads, concatenated over kv heads for ``layer``) and the key vector (the keys,
  concatenated likewise) are multiplied by per-layer projection matrices ``[G, n, r]`` fitted offline
  (:mod:`ds_msattn.attention.esa_calibrate`). Without projections the full-dimensional score is used (the paper's
  "without dimensionality reduction" ablation).
- **Proximity influence** (equation 8). The score of middle token j becomes the maximum of the scores within
  ``proximity`` (epsilon) tokens of it, the window clipped to M; then the ``top_k`` highest are selected (ties: the
  earlier token), all of M when it holds no more than ``top_k`` tokens.
- **Positions** (section 3.2, after InfLLM and ReRoPE): with ``far_positions="fixed"`` the chunk's queries see I and
  M_k as if at one fixed distance w (``far_distance``, default ``local_window``, InfLLM's ``n_local``): the queries
  are rotated to position w and those keys to position 0. L and the chunk keep their true positions. The selection
  score uses the same vectors, so it is the logit the middle token would get. ``far_positions="exact"`` keeps every
  key at its true position (the given q and k); then a ``top_k`` covering the middle is dense causal attention.

The reduced keys are recomputed at every call (no second cache beside the KV cache, unlike the paper's appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .api import _validate_tensors
from .options import check_rotary, make_options, rotate, unrotate
from .torch_path import _attend, _merge

SELECT_PER = ("layer", "kv_group")
FAR_POSITIONS = ("fixed", "exact")

#: The paper's settings for Llama-3-8B-Instruct / Mistral-7B (section 4.1): 128 initial tokens, 2048 selected middle
#: tokens, 4096 local tokens; chunks of 512 (InfLLM's block, which ESA's chunked prefill follows); epsilon 1, the
#: best value of its ablation (tables 5 and 7).
DEFAULT_ESA = {
    "top_k": 2048, "sink_tokens": 128, "local_window": 4096, "chunk_size": 512, "proximity": 1,
    "select_per": "layer", "far_positions": "fixed", "far_distance": None,
}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class ESAParams:
    """Validated ESA parameters (module docstring); ``distance`` is w of ``far_positions="fixed"``."""

    top_k: int = DEFAULT_ESA["top_k"]
    sink_tokens: int = DEFAULT_ESA["sink_tokens"]
    local_window: int = DEFAULT_ESA["local_window"]
    chunk_size: int = DEFAULT_ESA["chunk_size"]
    proximity: int = DEFAULT_ESA["proximity"]
    select_per: str = DEFAULT_ESA["select_per"]
    far_positions: str = DEFAULT_ESA["far_positions"]
    far_distance: int | None = DEFAULT_ESA["far_distance"]

    def __post_init__(self):
        for name, low in (("top_k", 0), ("sink_tokens", 0), ("local_window", 0), ("chunk_size", 1), ("proximity", 0)):
            _check_int(name, getattr(self, name), low)
        for name, allowed in (("select_per", SELECT_PER), ("far_positions", FAR_POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.far_distance is not None:
            _check_int("far_distance", self.far_distance, 0)

    @property
    def distance(self) -> int:
        return self.local_window if self.far_distance is None else self.far_distance


def make_params(**kwargs) -> ESAParams:
    """:class:`ESAParams` from keyword arguments; None values take the defaults (``far_distance`` None: the window)."""
    return ESAParams(**{key: value for key, value in kwargs.items() if value is not None})


def segments(a: int, sink_tokens: int, local_window: int) -> tuple[int, int]:
    """``(i_end, l_start)`` for a chunk starting at token a: I = ``[0, i_end)``, M = ``[i_end, l_start)`` (empty unless
    ``i_end == sink_tokens``), L = ``[l_start, a)``."""
    i_end = min(sink_tokens, a)
    return i_end, max(i_end, a - local_window)


def far_vectors(q: torch.Tensor, k: torch.Tensor, params: ESAParams, inv_freq, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """The q and k that I and the middle tokens are attended (and scored) with, in the compute dtype.

    ``fixed``: q rotated from its position p to w (by ``w - p``), k rotated back to 0; ``exact``: q and k as given.
    q ``[B, Hq, Tq, D]`` are the last Tq of the ``positions [B, Tk]``.
    """
    dtype = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    if params.far_positions == "exact":
        return q.to(dtype), k.to(dtype)
    q_pos = positions[:, positions.shape[1] - q.shape[2]:]  # [B, Tq]
    q_far = rotate(q.to(dtype), (params.distance - q_pos)[:, None, :], inv_freq)
    return q_far, unrotate(k, positions, inv_freq).to(dtype)


def selection_vectors(q_far: torch.Tensor, k_far: torch.Tensor, select_per: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectors whose dot products are the importance scores: ``([B, G, Tq, n], [B, G, Tk, n])``.

    The query vector of kv head g is the sum of its query heads' vectors, so that its dot product with the key of g
    is ``sum_{h in g} q_h . k_g``. ``kv_group``: G = Hkv, n = D. ``layer``: G = 1, the Hkv vectors concatenated
    (n = Hkv * D, kv head major), so that the dot product sums over every head of the layer (the paper's
    concatenation of H heads, with the repeated keys folded into the query sum).
    """
    B, Hq, Tq, D = q_far.shape
    Hkv = k_far.shape[1]
    q_sum = q_far.view(B, Hkv, Hq // Hkv, Tq, D).sum(2)  # [B, Hkv, Tq, D]
    if select_per == "kv_group":
        return q_sum, k_far
    return (q_sum.transpose(1, 2).reshape(B, 1, Tq, Hkv * D),
            k_far.transpose(1, 2).reshape(B, 1, k_far.shape[2], Hkv * D))


def select_middle(scores: torch.Tensor, top_k: int, proximity: int) -> torch.Tensor:
    """Equations 4 and 8 and the top-k: ``scores [..., nq, nM]`` of a chunk's queries -> sorted ``[..., min(k, nM)]``."""
    s = (scores - scores.amax(-1, keepdim=True)).amax(-2)  # [..., nM]
    nM = s.shape[-1]
    if proximity:
        lead = s.shape[:-1]
        s = F.max_pool1d(s.reshape(-1, 1, nM), 2 * proximity + 1, stride=1, padding=proximity).view(*lead, nM)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # ties: the earlier token first
    return order[..., : min(top_k, nM)].sort(-1).values


def check_esa_inputs(q, k, v, scale, params: ESAParams, rope_inv_freq, position_ids):
    """Shapes (the rules of ``ms_attention``, with ``Tq <= Tk``), scale and rotary inputs -> (scale, inv_freq, positions)."""
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)):
        _validate_tensors(q, k, v)  # raises naming the tensor
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq > Tk:
        raise ValueError(f"q has more tokens ({Tq}) than k ({Tk}): the queries are the last Tq of the Tk keys")
    if v.shape[2] != Tk:
        raise ValueError(f"sequence lengths differ: k {Tk}, v {v.shape[2]}")
    _validate_tensors(q, k[:, :, Tk - Tq:], v[:, :, Tk - Tq:])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if params.far_positions == "exact":
        return float(scale), None, None
    if rope_inv_freq is None:
        raise ValueError("rope_inv_freq (the [D/2] rotary frequencies of the model) is required with "
                         "far_positions='fixed' (I and the selected tokens are moved to a fixed distance)")
    rotary = make_options(score="position_free")  # the options that need the rotary inputs: the same checks
    inv_freq, positions = check_rotary(rotary, rope_inv_freq, position_ids, B=q.shape[0], T=Tk, D=q.shape[-1])
    return float(scale), inv_freq.to(q.device), positions.to(q.device)


def _check_projection(projection, G: int, n: int) -> None:
    if projection is None:
        return
    if not (isinstance(projection, (tuple, list)) and len(projection) == 2):
        raise ValueError("projection must be a pair (query [G, n, r], key [G, n, r]) or None")
    for name, p in zip(("query", "key"), projection):
        if not isinstance(p, torch.Tensor) or p.dim() != 3 or tuple(p.shape[:2]) != (G, n):
            raise ValueError(f"projection {name} matrix must have shape [G, n, r] = [{G}, {n}, r], "
                             f"got {tuple(getattr(p, 'shape', ()))}")
    if projection[0].shape[2] != projection[1].shape[2]:
        raise ValueError(f"projection ranks differ: query {projection[0].shape[2]}, key {projection[1].shape[2]}")


def esa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int | None = None, sink_tokens: int | None = None,
    local_window: int | None = None, chunk_size: int | None = None, proximity: int | None = None,
    select_per: str | None = None, far_positions: str | None = None, far_distance: int | None = None,
    projection: tuple[torch.Tensor, torch.Tensor] | None = None, rope_inv_freq: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """ESA (module docstring): q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` -> ``[B, Hq, Tq, Dv]``.

    ``projection``: this layer's (query, key) matrices ``[G, n, r]`` (G = 1, n = Hkv * D for ``select_per="layer"``;
    G = Hkv, n = D for ``kv_group``), or None for full-dimensional scores. ``rope_inv_freq [D/2]`` and
    ``position_ids`` (``[Tk]`` or ``[B, Tk]``, default ``arange(Tk)``) are needed by ``far_positions="fixed"``.
    None parameters take :data:`DEFAULT_ESA`.
    """
    params = make_params(top_k=top_k, sink_tokens=sink_tokens, local_window=local_window, chunk_size=chunk_size,
                         proximity=proximity, select_per=select_per, far_positions=far_positions,
                         far_distance=far_distance)
    scale, inv_freq, positions = check_esa_inputs(q, k, v, scale, params, rope_inv_freq, position_ids)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep, offset = Hq // Hkv, Tk - Tq
    G = 1 if params.select_per == "layer" else Hkv
    _check_projection(projection, G, D * Hkv // G)
    q_far, k_far = far_vectors(q, k, params, inv_freq, positions)
    dtype = q_far.dtype
    q_near, k_near, v_c = q.to(dtype), k.to(dtype), v.to(dtype)
    q_sel, k_sel = selection_vectors(q_far, k_far, params.select_per)
    if projection is not None:
        q_sel = q_sel @ projection[0].to(q.device, dtype)  # [B, G, Tq, r]
        k_sel = k_sel @ projection[1].to(q.device, dtype)
    out = torch.empty(B, Hkv, rep, Tq, v.shape[-1], dtype=dtype, device=q.device)
    fused = _fused(q_near, v_c)
    near_masks = {}  # (chunk length, tokens of L before it) -> the near part's mask: every full chunk shares one
    for c0 in range(0, Tq, params.chunk_size):
        c1 = min(Tq, c0 + params.chunk_size)
        n, a, b = c1 - c0, offset + c0, offset + c1
        i_end, l_start = segments(a, params.sink_tokens, params.local_window)
        # near part: L and the chunk itself, causal; the rep query heads of a kv head are stacked along the rows
        shape = (n, a - l_start)
        if shape not in near_masks:
            near_masks[shape] = _near_mask(*shape, rep, fused, dtype, q.device)
        o, lse = _attend(_stack(q_near, c0, c1, Hkv), k_near[:, :, l_start:b], v_c[:, :, l_start:b], False, scale,
                         fused, near_masks[shape])
        far = torch.arange(i_end, device=q.device).expand(B, G, i_end)
        if l_start > i_end and params.top_k:
            scores = q_sel[:, :, c0:c1] @ k_sel[:, :, i_end:l_start].transpose(-1, -2)  # [B, G, n, nM]
            far = torch.cat([far, select_middle(scores, params.top_k, params.proximity) + i_end], dim=-1)
        if far.shape[-1]:  # far part: I and M_k, every one visible, at their far positions; one softmax with near
            far = far.expand(B, Hkv, far.shape[-1])  # [B, Hkv, nF]: the layer's selection serves every kv head
            k_f = k_far.gather(2, far[..., None].expand(-1, -1, -1, D))
            v_f = v_c.gather(2, far[..., None].expand(-1, -1, -1, v.shape[-1]))
            o_f, lse_f = _attend(_stack(q_far, c0, c1, Hkv), k_f, v_f, False, scale, fused)
            o, lse = _merge(o_f, lse_f, o, lse)
        out[:, :, :, c0:c1] = o.view(B, Hkv, rep, n, -1)
    return out.view(B, Hq, Tq, -1).to(q.dtype)


def _stack(x: torch.Tensor, c0: int, c1: int, Hkv: int) -> torch.Tensor:
    """Rows c0..c1 of ``x [B, Hq, Tq, D]`` with each kv head's query heads stacked: ``[B, Hkv, rep * n, D]``."""
    B, Hq, _, D = x.shape
    return x[:, :, c0:c1].reshape(B, Hkv, Hq // Hkv * (c1 - c0), D)


def _fused(q: torch.Tensor, v: torch.Tensor) -> bool:
    """float32 on CPU: PyTorch's fused flash kernel (no ``[L, S]`` scores kept); otherwise matmuls."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] == v.shape[-1]


def _near_mask(n: int, before: int, rep: int, fused: bool, dtype, device) -> torch.Tensor:
    """The near part's mask, rows stacked for ``rep`` query heads: query i of an n-token chunk sees the ``before``
    tokens of L and the chunk's tokens up to i. Additive (0 / -inf) for the fused kernel, else boolean (True:
    attend)."""
    keep = (torch.arange(before + n, device=device)[None, :] <= before + torch.arange(n, device=device)[:, None])
    keep = keep.repeat(rep, 1)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf")) if fused else keep
