"""Triton selection kernel of MS attention: scores, per-region top-n, rank-major merge and dedupe in one pass.

One program per (query block, batch * ranking head): the ranking heads are the query heads
(``select_per="head"``) or the kv heads (``"kv_group"``, the group's query summaries summed beforehand, as
``selection.ranking_queries`` does). The program

1. loads its block's m query-region summaries ``qbar [m, D]`` (fp32) once;
2. walks the key-region summaries of its history in tiles of ``BLOCK_R`` regions: scores ``qbar . kbar``
   (``tl.dot``, fp32, no scale) -> int64 order keys (the fp32 bits made monotone, then ``R - 1 - j`` in the low
   word, exactly ``selection._order_key``: descending, ties to the lower region, no two keys equal) -> the
   tile's top ``LIST`` per query region (``tl.topk``, a bitonic network) merged with each region's running
   top ``LIST`` (``tl.join`` + ``tl.topk``); the lists live in registers, ``[BLOCK_MQ, LIST]``;
3. reads the lists rank-major (rank 0 of every region of the block in order, then rank 1, ...) and keeps the
   first n distinct regions: one vectorised round per rank, a candidate is new if it is neither among the
   regions chosen so far nor an earlier region's candidate in the same round; the round's new ones take the
   next slots in region order (a prefix sum) until n are chosen;
4. writes the row of ``sel`` (sinks ``0..s-1``, then the chosen regions ascending; a block whose history
   has at most ``K - m`` regions takes all of it) for each query head it ranks for (G rows for kv_group).

No score matrix is stored: memory is the inputs' summaries (``O((T/c) * D)``) and ``sel`` itself.

Scores are fp32 dot products as in :func:`ds_msattn.attention.select_regions`, but summed in another order:
the selections are identical except where two candidates' scores differ only in the last bits of fp32
(exact ties go to the lower region in both). Registers bound the fused lists: ``BLOCK_MQ * LIST`` entries
(``pow2(m) * pow2(n)``, at most :data:`MAX_LIST_ENTRIES`: c16 K64 m16 takes 16 * 64); beyond that
:func:`select_regions_triton` falls back to the PyTorch selection (the paper's c16 K512 m128 needs 128 * 512).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ds_msattn.attention.options import MSOptions
from ds_msattn.attention.selection import (
    _validate_params,
    ranking_queries,
    region_means,
    select_regions,
    summary_inputs,
)

from .function import interpreting

#: Largest ``pow2(m) * pow2(n)`` (register-resident candidate lists) the fused kernel takes.
MAX_LIST_ENTRIES = 4096
_KEY_MIN = tl.constexpr(-(2**63))  # the key of "no candidate": below every real key


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, x)))


@triton.jit
def _top(x, K: tl.constexpr, BY_RANK: tl.constexpr):
    """The ``K`` largest entries of each row of ``x [ROWS, COLS]``, descending (``tl.topk``).

    ``BY_RANK``: the same by counting, for each entry, the entries before it (greater, or equal and to its left)
    and placing it at that rank: one ``[ROWS, COLS, COLS]`` comparison. Under the interpreter ``tl.topk``'s
    bitonic network runs its xor-reductions element by element in Python (seconds per call); this is numpy."""
    if BY_RANK:
        COLS: tl.constexpr = x.shape[1]
        c = tl.arange(0, COLS)
        xi = x[:, :, None]
        xj = x[:, None, :]
        before = (xj > xi) | ((xj == xi) & (c[None, None, :] < c[None, :, None]))
        rank = tl.sum(before.to(tl.int32), 2)  # [ROWS, COLS], a permutation of 0..COLS-1 per row
        t = tl.arange(0, K)
        out = tl.max(tl.where(rank[:, :, None] == t[None, None, :], xi, _KEY_MIN), 1)  # [ROWS, K]
    else:
        out = tl.topk(x, K)
    return out


@triton.jit
def ms_select_kernel(
    QBAR, KBAR, SEL,
    R, NB, HS, HKV, HQ, MERGE, BUDGET, SINKS, N, D,
    BLOCK_MQ: tl.constexpr, BLOCK_R: tl.constexpr, LIST: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, PREC: tl.constexpr, TOP_BY_RANK: tl.constexpr = False, SCORE_BY_SUM: tl.constexpr = False,
):
    """``QBAR [B, HS, R, D]``, ``KBAR [B, HKV, R, D]`` fp32 -> ``SEL [B, HQ, NB, BUDGET]`` int64 (all slots written)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)  # batch * ranking head
    b = bh // HS
    hs = bh % HS
    hkv = hs * HKV // HS  # the kv head whose keys this head ranks
    group = HQ // HS  # query heads sharing this selection
    hist = blk * MERGE
    s = tl.arange(0, BLOCK_S)
    if hist <= BUDGET:  # short history: all of it
        row = tl.where(s < hist, s, -1)
    else:
        i = tl.arange(0, BLOCK_MQ)
        qrow = blk * MERGE + i
        q_ok = (i < MERGE) & (qrow < R)  # the last block may be short
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        qb = tl.load(QBAR + (bh.to(tl.int64) * R + qrow)[:, None] * D + d[None, :], mask=q_ok[:, None] & d_ok[None, :],
                     other=0.0)
        k_base = (b * HKV + hkv).to(tl.int64) * R
        lists = tl.full([BLOCK_MQ, LIST], _KEY_MIN, tl.int64)
        scan_end = tl.where(N > 0, hist, SINKS)  # sinks alone fill the budget: nothing to rank
        for start in range(SINKS, scan_end, BLOCK_R):
            j = start + tl.arange(0, BLOCK_R)
            j_ok = j < hist
            kb = tl.load(KBAR + (k_base + j)[:, None] * D + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            if SCORE_BY_SUM:  # interpreter: numpy's matmul can round equal columns differently, breaking exact ties
                score = tl.sum(qb[:, None, :] * kb[None, :, :], 2)
            else:
                score = tl.dot(qb, tl.trans(kb), input_precision=PREC)  # [BLOCK_MQ, BLOCK_R]
            score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0, as selection._order_key
            bits = score.to(tl.int32, bitcast=True)
            ordered = tl.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # monotone in the float value
            key = (ordered.to(tl.int64) << 32) + (R - 1 - j)[None, :]
            key = tl.where(j_ok[None, :], key, _KEY_MIN)
            top = _top(key, LIST, TOP_BY_RANK)  # [BLOCK_MQ, LIST], descending
            lists = _top(tl.reshape(tl.join(lists, top), [BLOCK_MQ, 2 * LIST]), LIST, TOP_BY_RANK)
        low = lists - ((lists >> 32) << 32)  # the low word, R - 1 - j
        ids = tl.where(lists == _KEY_MIN, -1, R - 1 - low).to(tl.int32)  # [BLOCK_MQ, LIST] ranked region ids

        # Rank-major merge: round r reads rank r of every query region of the block, in region order.
        cols = tl.arange(0, LIST)
        chosen = tl.full([LIST], -1, tl.int32)
        count = tl.sum(tl.zeros([BLOCK_MQ], tl.int32), 0)
        r = tl.sum(tl.zeros([BLOCK_MQ], tl.int32), 0)
        while (count < N) & (r < N):
            cand = tl.max(tl.where(cols[None, :] == r, ids, -1), 1)  # [BLOCK_MQ]
            cand = tl.where(q_ok, cand, -1)
            seen = tl.max(tl.where(chosen[None, :] == cand[:, None], 1, 0), 1) > 0
            dup = tl.max(tl.where((cand[:, None] == cand[None, :]) & (i[None, :] < i[:, None]), 1, 0), 1) > 0
            new = (cand >= 0) & ~seen & ~dup
            new_i = new.to(tl.int32)
            slot = count + tl.cumsum(new_i, 0) - new_i
            take = new & (slot < N)
            placed = tl.max(tl.where(take[None, :] & (slot[None, :] == cols[:, None]), cand[None, :], -1), 1)
            chosen = tl.maximum(chosen, placed)
            count += tl.sum(take.to(tl.int32), 0)
            r += 1
        # Ascending after the sinks: each chosen region's slot is SINKS + the number of smaller chosen ones.
        smaller = tl.sum(((chosen[None, :] < chosen[:, None]) & (chosen[None, :] >= 0)).to(tl.int32), 1)
        at = tl.where(chosen >= 0, SINKS + smaller, -1)  # [LIST]
        picked = tl.max(tl.where(at[None, :] == s[:, None], chosen[None, :], -1), 1)  # [BLOCK_S]
        row = tl.where(s < SINKS, s, picked)
    out = row.to(tl.int64)
    for g in range(0, group):
        h = hs * group + g
        tl.store(SEL + ((b * HQ + h).to(tl.int64) * NB + blk) * BUDGET + s, out, mask=s < BUDGET)


def kernel_sizes(merge: int, n: int, budget: int, head_dim: int) -> dict:
    """Constexpr tile sizes of :func:`ms_select_kernel` for a call."""
    lst = _pow2(n)
    return dict(BLOCK_MQ=_pow2(merge), LIST=lst, BLOCK_R=max(32, lst), BLOCK_D=_pow2(head_dim), BLOCK_S=_pow2(budget))


def num_warps(sizes: dict) -> int:
    """Warps of a launch: more for longer lists (registers per thread)."""
    return 4 if sizes["BLOCK_MQ"] * sizes["LIST"] <= 1024 else 8


def fits_kernel(merge: int, n: int) -> bool:
    """Whether the fused kernel takes these sizes (its candidate lists fit in registers)."""
    return _pow2(merge) * _pow2(n) <= MAX_LIST_ENTRIES


@torch.no_grad()
def select_regions_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    region_size: int,
    top_k: int,
    merge: int,
    sink_regions: int = 1,
    options: MSOptions = MSOptions(),
    rope_inv_freq: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    numpy_forms: bool | None = None,
) -> torch.Tensor:
    """:func:`ds_msattn.attention.select_regions` with the selection kernel: ``sel [B, Hq, NB, top_k - merge]`` int64.

    ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``; summaries (``options.score``, ``options.select_per``) are made in
    PyTorch (one pass over q and k), everything after in the kernel. Sizes whose lists would not fit in
    registers (:func:`fits_kernel`) go to the PyTorch selection. ``numpy_forms`` picks the kernel's forms of the
    top lists and scores (by rank and by an elementwise sum: default under the interpreter; ``tl.topk`` and
    ``tl.dot`` compiled; the same lists and selection).
    """
    _validate_params(region_size, top_k, merge, sink_regions)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    c, m = region_size, merge
    R = math.ceil(T / c)
    NB = math.ceil(R / m)
    budget = top_k - m
    sinks = min(sink_regions, budget)
    n = budget - sinks
    common = dict(region_size=c, top_k=top_k, merge=m, sink_regions=sink_regions, options=options,
                  rope_inv_freq=rope_inv_freq, positions=positions)
    if budget == 0 or not fits_kernel(m, n):
        return select_regions(q, k, **common)
    sel = torch.empty(B, Hq, NB, budget, dtype=torch.int64, device=q.device)
    if (NB - 1) * m <= budget:  # every history is short: no scores needed
        qbar = kbar = torch.zeros(1, dtype=torch.float32, device=q.device)
        Hs = Hq
    else:
        qs, ks = summary_inputs(q, k, options, rope_inv_freq, positions)
        qbar = ranking_queries(region_means(qs, c), Hkv, options).contiguous()  # [B, Hq or Hkv, R, D] fp32
        kbar = region_means(ks, c).contiguous()  # [B, Hkv, R, D]
        Hs = qbar.shape[1]
    if options.per_kv_group and Hs == Hq and Hq != Hkv:
        Hs = Hkv  # (only reached with short histories, where the summaries are not made)
    sizes = kernel_sizes(m, n, budget, D)
    numpy_forms = interpreting() if numpy_forms is None else numpy_forms
    ms_select_kernel[(NB, B * Hs)](
        qbar, kbar, sel, R, NB, Hs, Hkv, Hq, m, budget, sinks, n, D, **sizes, PREC="ieee",
        TOP_BY_RANK=numpy_forms, SCORE_BY_SUM=numpy_forms,
        num_warps=num_warps(sizes),
    )
    return sel
