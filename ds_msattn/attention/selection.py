"""Region summaries, scores and the select-and-merge rule of MS attention (DESIGN.md).

Everything here is vectorised and shared by every fast backend (torch and Triton), so that they
attend to exactly the same regions. The reference implementation has its own, loop-based copy of
the rule (``reference.py``); tests compare the two.

Shapes: ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``; R = ceil(T / c) regions, NB = ceil(R / m)
blocks. The result of :func:`select_regions` is ``sel [B, Hq, NB, K - m]`` (int64), the selected
history regions of every query block in ascending order, padded with -1. The options ``score`` and
``select_per`` act here (:func:`summary_inputs`, :func:`ranking_queries`, :func:`per_query_head`).
"""

from __future__ import annotations

import math

import torch

from .options import MSOptions, unrotate

# Score matrices of about this many elements (32x on CUDA) are materialised at once (block-chunked selection).
SCORE_BUDGET = 1 << 20


def region_means(x: torch.Tensor, region_size: int) -> torch.Tensor:
    """Mean of ``x [B, H, T, D]`` over each region of ``region_size`` tokens -> ``[B, H, R, D]`` (fp32).

    The last region may be short; it is averaged over the tokens it has.
    """
    B, H, T, D = x.shape
    R = math.ceil(T / region_size)
    pad = R * region_size - T
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.view(B, H, R, region_size, D).sum(dim=3)  # [B, H, R, D]
    counts = torch.full((R,), float(region_size), device=x.device)
    counts[-1] = region_size - pad
    return sums / counts[:, None]


def _order_key(scores: torch.Tensor, columns: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
    """int64 keys that sort like ``scores [..., R]`` (descending) with ties broken towards the lower index.

    fp32 values map to int32 keys in the same order; the low 32 bits hold ``R - 1 - j`` so that equal scores
    rank the lower region first and no two keys of a row are equal (``topk`` is then exact). Values picked
    out of a wider row pass their ``columns`` (``j``) and that row's ``width`` (``R``): they get the keys they
    had there.
    """
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # monotone in the float value
    if columns is None:
        columns = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    return ordered * (1 << 32) + ((scores.shape[-1] if width is None else width) - 1 - columns)


def _top_by_keys(scores: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """The exact rule through int64 order keys (every element keyed; the slower, always exact path)."""
    keys = _order_key(scores)
    keys.masked_fill_(~valid, torch.iinfo(torch.int64).min)
    return keys.topk(n, dim=-1).indices


def top_ranked(scores: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` best valid columns of each row of ``scores [..., cols]``, best first, ties to the lower index.

    ``valid`` broadcasts against ``scores`` (False: not a candidate). The float ``topk`` finds the set; where the
    row's n-th value is tied with a value left out, which set ``topk`` returns is unspecified, so such rows (rare:
    ties at the threshold, or fewer than ``n`` candidates) are redone with the int64 order keys of
    :func:`_order_key` (a row with fewer than ``n`` candidates then ends with invalid columns). ``scores`` (fp32)
    is overwritten. ``topk`` returns the set best first; rows where two chosen values are equal (rare) are
    reordered by the order keys, so that equal values keep the lower index first.
    """
    if n == 0:
        return scores.new_zeros(scores.shape[:-1] + (0,), dtype=torch.int64)
    scores = scores.float().masked_fill_(~valid, float("-inf"))
    vals, idx = scores.topk(n, dim=-1, sorted=True)  # descending; equal values in no specified order
    exact = (scores >= vals[..., -1:]).sum(dim=-1, dtype=torch.int32) == n  # no tie left outside the set
    if not bool(exact.all()):
        bad = ~exact
        rows = scores[bad]  # [rows, cols]; invalid columns already -inf, keyed below the valid ones
        idx[bad] = _top_by_keys(rows, valid.expand_as(scores)[bad], n)  # best first, ties to the lower index
        vals[bad] = rows.gather(-1, idx[bad])
    tied = (vals[..., 1:] == vals[..., :-1]).any(dim=-1) & exact
    if bool(tied.any()):
        vt, it = vals[tied], idx[tied]
        idx[tied] = it.gather(-1, _order_key(vt, it, scores.shape[-1]).sort(dim=-1, descending=True).indices)
    return idx


def _validate_params(region_size: int, top_k: int, merge: int, sink_regions: int) -> None:
    for name, value in (("region_size", region_size), ("top_k", top_k), ("merge", merge)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if merge > top_k:
        raise ValueError(f"merge must be <= top_k (1 <= merge <= top_k), got merge={merge}, top_k={top_k}")
    if not isinstance(sink_regions, int) or isinstance(sink_regions, bool) or sink_regions < 0:
        raise ValueError(f"sink_regions must be an integer >= 0, got {sink_regions!r}")


def summary_inputs(q, k, options: MSOptions, inv_freq, positions):
    """What the region summaries are means of: ``q, k`` as given (``score="rope"``) or unrotated.

    ``positions [B, T]`` are the positions q and k were rotated with; fp32 results when unrotated.
    """
    if options.score == "rope":
        return q, k
    return unrotate(q, positions, inv_freq), unrotate(k, positions, inv_freq)


def ranking_queries(qbar: torch.Tensor, Hkv: int, options: MSOptions) -> torch.Tensor:
    """Query summaries that rank: ``qbar [B, Hq, R, D]`` itself, or (``kv_group``) summed per kv head ``[B, Hkv, R, D]``.

    ``sum_h qbar[h] . kbar[g] == (sum_h qbar[h]) . kbar[g]``: one score per kv head and region pair.
    """
    if not options.per_kv_group:
        return qbar
    B, Hq, R, D = qbar.shape
    return qbar.view(B, Hkv, Hq // Hkv, R, D).sum(2)


def per_query_head(sel: torch.Tensor, Hq: int) -> torch.Tensor:
    """A selection made per kv head ``[B, Hkv, ...]`` -> one row per query head ``[B, Hq, ...]`` (no-op if already)."""
    G = Hq // sel.shape[1]
    return sel if G == 1 else sel.repeat_interleave(G, dim=1)


@torch.no_grad()
def select_regions(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    region_size: int,
    top_k: int,
    merge: int,
    sink_regions: int = 1,
    score_budget: int | None = None,
    options: MSOptions = MSOptions(),
    rope_inv_freq: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selected history regions of every query block: ``sel [B, Hq, NB, top_k - merge]``, -1 padded.

    Rows are ascending. A block whose history has at most ``top_k - merge`` regions selects all of
    it; otherwise the sinks plus the first ``n`` distinct regions of the rank-major merge of its
    regions' top-n lists (docs/design.md). Scores are computed block-chunk by block-chunk so that at
    most about ``score_budget`` of the ``(T/c)^2`` score matrix exists at once. ``options.score`` and
    ``options.select_per`` choose the summaries and who ranks (``rope_inv_freq [D/2]`` and
    ``positions [B, T]`` for ``position_free``).
    """
    _validate_params(region_size, top_k, merge, sink_regions)
    B, Hq, T, D = q.shape
    c, m = region_size, merge
    R = math.ceil(T / c)
    NB = math.ceil(R / m)
    budget = top_k - m  # history regions a block may select
    sinks = min(sink_regions, budget)
    n = budget - sinks
    device = q.device
    sel = torch.full((B, Hq, NB, budget), -1, dtype=torch.int64, device=device)
    if budget == 0:
        return sel

    # Blocks with a short history select all of it (b*m <= budget).
    dense_blocks = min(NB, budget // m + 1)
    slots = torch.arange(budget, device=device)
    for b in range(dense_blocks):
        hist = b * m
        sel[:, :, b, :hist] = slots[:hist]
    if dense_blocks >= NB:
        return sel

    qs, ks = summary_inputs(q, k, options, rope_inv_freq, positions)
    qbar = ranking_queries(region_means(qs, c), k.shape[1], options)  # [B, Hq or Hkv, R, D]
    kbar = region_means(ks, c)  # [B, Hkv, R, D]
    Hs = qbar.shape[1]
    # Pad the query regions to whole blocks by repeating each block's first region: its candidate
    # list then only repeats entries already read in the same round, which changes nothing.
    Rp = NB * m
    if Rp > R:
        fill = qbar[:, :, (NB - 1) * m : (NB - 1) * m + 1].expand(B, Hs, Rp - R, D)
        qbar = torch.cat([qbar, fill], dim=2)
    blocks = torch.arange(dense_blocks, NB, device=device)
    qbar_blocks = qbar.view(B, Hs, NB, m, D)[:, :, dense_blocks:]
    chosen = select_history(qbar_blocks, kbar, blocks, merge=m, sinks=sinks, n=n, score_budget=score_budget)
    sel[:, :, dense_blocks:] = per_query_head(chosen, Hq)
    return sel


def select_history(
    qbar_blocks: torch.Tensor,
    kbar: torch.Tensor,
    blocks: torch.Tensor,
    *,
    merge: int,
    sinks: int,
    n: int,
    score_budget: int | None = None,
) -> torch.Tensor:
    """The select-and-merge rule for blocks whose history exceeds the budget (``b*m > sinks + n``).

    Args:
        qbar_blocks: ``[B, Hq, nb, m, D]`` query-region summaries of the blocks (regions past the end replaced
            by their block's first region: its candidate list only repeats entries already read in the same round).
        kbar: ``[B, Hkv, R, D]`` key-region summaries (global ids).
        blocks: ``[nb]`` ascending global block ids.

    Returns:
        ``[B, Hq, nb, sinks + n]`` region ids, ascending. Scores are made chunk by chunk of blocks, each against
        only the history columns it can select, about ``score_budget`` elements at a time.
    """
    B, Hq, nb, m, D = qbar_blocks.shape
    Hkv, R = kbar.shape[1], kbar.shape[2]
    G = Hq // Hkv
    device = qbar_blocks.device
    if score_budget is None:
        score_budget = SCORE_BUDGET * (32 if qbar_blocks.is_cuda else 1)  # fewer, larger chunks keep a GPU busy
    chunk = max(1, score_budget // max(1, B * Hq * m * R))
    region_ids = torch.arange(R, device=device)
    sink_ids = torch.arange(sinks, device=device)
    qbar_g = qbar_blocks.reshape(B, Hkv, G, nb, m, D)
    out = torch.empty(B, Hq, nb, sinks + n, dtype=torch.int64, device=device)
    for i0 in range(0, nb, chunk):
        i1 = min(nb, i0 + chunk)
        ids = blocks[i0:i1]
        cols = int(ids[-1]) * m  # history of the chunk's last block: no later region is a candidate
        # scores[b, h, blk, i, j] = qbar[h, i] . kbar[g, j]   (no scale)
        qs = qbar_g[:, :, :, i0:i1].reshape(B, Hkv, G * (i1 - i0) * m, D)
        scores = torch.matmul(qs, kbar[:, :, :cols].transpose(-1, -2)).view(B, Hq, i1 - i0, m, cols)
        # Candidates of block b: sinks <= j < b*m.
        candidates = region_ids[None, :cols]
        valid = (candidates >= sinks) & (candidates < ids[:, None] * m)  # [nb, cols]
        ranked = top_ranked(scores, valid[None, None, :, None, :], n)  # [B, Hq, nb, m, n]
        # Rank-major reading: rank 0 of every region of the block, then rank 1, ...; the first n distinct.
        stream = ranked.transpose(-1, -2).reshape(B, Hq, i1 - i0, n * m)
        L = n * m
        first = torch.full((B, Hq, i1 - i0, cols), L, dtype=torch.int64, device=device)
        first.scatter_reduce_(-1, stream, torch.arange(L, device=device).expand_as(stream), reduce="amin")
        chosen = first.topk(n, dim=-1, largest=False).indices if n > 0 else first[..., :0]
        rows = torch.cat([sink_ids.expand(B, Hq, i1 - i0, sinks), chosen], dim=-1)
        out[:, :, i0:i1] = rows.sort(dim=-1).values
    return out

def selected_counts(T: int, *, region_size: int, top_k: int, merge: int) -> torch.Tensor:
    """Number of valid (non -1) entries in each block's row of :func:`select_regions` -> ``[NB]``."""
    R = math.ceil(T / region_size)
    NB = math.ceil(R / merge)
    hist = torch.arange(NB) * merge
    return hist.clamp(max=top_k - merge)
