"""MS attention for KV-cache decoding: queries are the last ``Lq`` of ``Lkv`` positions.

The exact definition (DESIGN.md) scores history regions with the mean query of every region of a
block, which needs queries that do not exist yet while decoding. The decode rule used here is
causal and per token, so a token's output depends only on its own query and the keys and values at
positions ``<= t`` (never on how the input was split into prefill and decode steps):

- query token t lies in block ``b = t // (m*c)``; it attends densely to its own block's tokens at
  positions ``<= t``;
- its history is the regions ``j < b*m`` (all complete). If there are at most ``K - m`` of them,
  all are attended (so short inputs, and any input with ``K*c >= Lkv``, give dense causal attention);
- else the sinks ``0 .. min(s, K-m)-1`` plus the ``n = K - m - min(s, K-m)`` other history regions
  with the highest score ``q_t . kbar[g, j]`` (no scale; ties to the lower j): the token's own
  query acts as its block's summary (the definition with m = 1 region of one token).

The options of docs/design.md act as in prefill: ``score="position_free"`` scores unrotated queries against
summaries of unrotated keys, ``select_per="kv_group"`` ranks per kv head by the sum of the group's query
scores, and ``far_positions`` moves the selected keys of token t's block (block start ``(t // (m*c)) * m*c``).

Equal to :func:`ms_attention` wherever every history fits (dense regime). In the sparse regime it
differs from the block rule by construction (per-token instead of per-block summaries), which is why
``ms_attention_decode`` with ``Lq == Lkv`` is not ``ms_attention``; it equals decoding token by token.

Memory: ``kbar [B, Hkv, R, D]`` plus, per chunk of queries, scores ``[B, Hq, lq, R]`` and gathered
keys ``[B, Hq, lq, K*c, D]`` bounded by ``CHUNK_BUDGET`` elements; no ``[Lq, Lkv]`` tensor.
"""

from __future__ import annotations

import torch

from .options import check_rotary, key_shifts, make_options, rotate, unrotate
from .selection import _validate_params, per_query_head, ranking_queries, region_means, top_ranked

# Elements of gathered keys (or scores) one chunk of queries may hold.
CHUNK_BUDGET = 1 << 23


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D], got {getattr(x, 'shape', type(x))}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] < 1 or Hq % k.shape[1] != 0 or v.shape[1] != k.shape[1]:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({k.shape[1]}, {v.shape[1]})")
    if k.shape[3] != D:
        raise ValueError(f"k head dim must equal q head dim {D}, got {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if not 1 <= Lq <= k.shape[2]:
        raise ValueError(f"query length Lq must be in [1, Lkv={k.shape[2]}], got {Lq}")


def decode_selection(
    q: torch.Tensor, kbar: torch.Tensor, positions: torch.Tensor, *, region_size: int, top_k: int, merge: int,
    sink_regions: int,
) -> torch.Tensor:
    """History regions of each query under the decode rule -> ``[B, Hq, lq, K - m]`` int64, -1 padded.

    ``q [B, Hq, lq, D]`` at absolute ``positions [lq]``; ``kbar [B, Hkv, R, D]`` region means of the
    keys (only complete history regions are ever read). Rows are ascending.
    """
    B, Hq, lq, D = q.shape
    Hkv, R = kbar.shape[1], kbar.shape[2]
    G = Hq // Hkv
    c, m = region_size, merge
    budget = top_k - m
    sinks = min(sink_regions, budget)
    n = budget - sinks
    device = q.device
    hist = (positions // (m * c)) * m  # [lq] history regions of each query
    slots = torch.arange(budget, device=device)
    dense = torch.where(slots[None, :] < hist[:, None], slots[None, :], -1)  # [lq, budget]
    sel = dense.expand(B, Hq, lq, budget).clone()
    sparse = hist > budget  # [lq] queries whose history does not fit
    if budget == 0 or not bool(sparse.any()):
        return sel
    if n == 0:  # the budget holds only sinks
        return torch.where(sparse[None, None, :, None], torch.where(slots < sinks, slots, -1), sel)
    scores = torch.matmul(q.float().view(B, Hkv, G * lq, D), kbar.transpose(-1, -2)).view(B, Hq, lq, R)
    region_ids = torch.arange(R, device=device)
    valid = (region_ids[None, :] >= sinks) & (region_ids[None, :] < hist[:, None])  # [lq, R]
    chosen = top_ranked(scores, valid, min(n, R))  # [B, Hq, lq, n]; rows of dense queries are replaced below
    sink_ids = torch.arange(sinks, device=device).expand(B, Hq, lq, sinks)
    rows = torch.cat([sink_ids, chosen], dim=-1).sort(dim=-1).values
    if rows.shape[-1] < budget:
        rows = torch.cat([rows, rows.new_full((B, Hq, lq, budget - rows.shape[-1]), -1)], dim=-1)
    return torch.where(sparse[None, None, :, None], rows, sel)


def ms_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    region_size: int,
    top_k: int,
    merge: int,
    sink_regions: int = 1,
    scale: float | None = None,
    far_positions: str | None = None,
    far_window: int | None = None,
    far_group: int | None = None,
    score: str | None = None,
    select_per: str | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """MS attention of the last ``Lq`` positions over a KV cache (decode rule in the module docstring).

    Args:
        q: ``[B, Hq, Lq, D]`` queries of positions ``Lkv - Lq .. Lkv - 1``, RoPE applied.
        k: ``[B, Hkv, Lkv, D]`` cached keys including the new ones; ``Hq % Hkv == 0``.
        v: ``[B, Hkv, Lkv, Dv]`` cached values.
        region_size, top_k, merge, sink_regions: as in :func:`ms_attention`.
        scale: softmax scale, default ``D ** -0.5``.
        far_positions, far_window, far_group, score, select_per, rope_inv_freq: as in :func:`ms_attention`.
        position_ids: ``[Lkv]`` or ``[B, Lkv]`` positions the cached keys were rotated with (the queries are
            the last Lq of them); default ``arange(Lkv)``.

    Returns:
        ``o [B, Hq, Lq, Dv]`` in q's dtype (softmax in fp32).
    """
    _validate_params(region_size, top_k, merge, sink_regions)
    _validate(q, k, v)
    options = make_options(
        far_positions=far_positions, far_window=far_window, far_group=far_group, score=score, select_per=select_per
    )
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    inv_freq, positions = check_rotary(options, rope_inv_freq, position_ids, B=B, T=Lkv, D=D)
    position_free = options.score == "position_free"
    if position_free:  # selection scores unrotated queries against summaries of unrotated keys
        k_summary = unrotate(k, positions, inv_freq)
        q_summary = unrotate(q, positions[:, Lkv - Lq :], inv_freq)
    else:
        k_summary, q_summary = k, q
    G = Hq // Hkv
    c, m = region_size, merge
    mc = m * c
    scale = D**-0.5 if scale is None else float(scale)
    start = Lkv - Lq
    # Only regions that are some query's history are summarised (all complete).
    R_hist = max(1, ((Lkv - 1) // mc) * m)
    kbar = region_means(k_summary[:, :, : R_hist * c], c) if Lkv >= c else k.new_zeros(B, Hkv, 1, D).float()
    S = top_k - m
    keys_per_query = S * c + mc
    lq = max(1, min(Lq, CHUNK_BUDGET // max(1, B * Hq * max(keys_per_query * max(D, Dv), R_hist))))
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    kf = k.reshape(B * Hkv, Lkv, D)
    vf = v.reshape(B * Hkv, Lkv, Dv)
    head_row = (torch.arange(B * Hkv, device=q.device) * Lkv).view(B, Hkv, 1, 1)
    offs_c = torch.arange(c, device=q.device)
    offs_mc = torch.arange(mc, device=q.device)
    for a in range(0, Lq, lq):
        e = min(Lq, a + lq)
        qc = q[:, :, a:e]  # [B, Hq, l, D]
        l = e - a
        pos = torch.arange(start + a, start + e, device=q.device)  # [l]
        ranking = ranking_queries(q_summary[:, :, a:e], Hkv, options)  # [B, Hq or Hkv, l, D]
        sel = per_query_head(
            decode_selection(ranking, kbar, pos, region_size=c, top_k=top_k, merge=m, sink_regions=sink_regions), Hq
        )
        # Key positions: selected regions' tokens, then the own block's tokens.
        sel_pos = (sel.clamp(min=0)[..., None] * c + offs_c).reshape(B, Hq, l, S * c).clamp(max=Lkv - 1)
        sel_ok = (sel >= 0)[..., None].expand(B, Hq, l, S, c).reshape(B, Hq, l, S * c)
        own_pos = ((pos // mc) * mc)[:, None] + offs_mc  # [l, mc]
        own_ok = own_pos <= pos[:, None]
        key_pos = torch.cat([sel_pos, own_pos.clamp(max=Lkv - 1).expand(B, Hq, l, mc)], dim=-1)
        ok = torch.cat([sel_ok, own_ok.expand(B, Hq, l, mc)], dim=-1)  # [B, Hq, l, keys]
        # Rows into the flat [B*Hkv*Lkv] view; query head h reads kv head h // G.
        rows = (key_pos.view(B, Hkv, G * l, keys_per_query) + head_row).reshape(-1)
        kg = kf.reshape(-1, D).index_select(0, rows).view(B, Hq, l, keys_per_query, D)
        if options.moves_keys and S:  # the selected keys of each token's block sit at their far positions
            shift = key_shifts(sel, pos // mc, region_size=c, merge=m, options=options).view(B, Hq, l, S * c)
            kg = torch.cat([rotate(kg[..., : S * c, :], shift, inv_freq), kg[..., S * c :, :]], dim=-2)
        vg = vf.reshape(-1, Dv).index_select(0, rows).view(B, Hq, l, keys_per_query, Dv)
        s = torch.einsum("bhld,bhlkd->bhlk", qc.float(), kg.float()) * scale
        s.masked_fill_(~ok, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, :, a:e] = torch.einsum("bhlk,bhlkd->bhld", p, vg.float()).to(q.dtype)
    return out


def dense_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense causal attention of the last ``Lq`` positions (float64), for tests: ``[B, Hq, Lq, Dv]``."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    kd = k.double().repeat_interleave(G, dim=1)
    vd = v.double().repeat_interleave(G, dim=1)
    s = torch.matmul(q.double(), kd.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lkv]
    qpos = torch.arange(Lkv - Lq, Lkv)[:, None]
    s = s.masked_fill(torch.arange(Lkv)[None, :] > qpos, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vd).to(q.dtype)

