"""Triton backward kernels of MS attention and the reverse index that drives the dk/dv kernel.

Gradients (base-2 scores ``s2 = scale*log2(e) * q.k``, ``p = exp2(s2 - lse2)``, ``delta = rowsum(do * o)``):
``dv = p^T do``, ``ds = p * (do v^T - delta)``, ``dq = scale * ds k``, ``dk = scale * ds^T q``.

- ``ms_attention_dq_kernel``: one program per query tile, the same key walk as the forward kernel
  (selected regions, then the causal own block); dq is written once, no accumulation across programs.
- ``ms_attention_dkdv_kernel``: one program per (key region, batch * kv head). A region's keys receive
  gradient from every (query head, query block) that selected it, and from its own block (causally).
  Those lists come from a *reverse index* of ``sel`` built in PyTorch with one stable sort
  (:func:`reverse_index`), so each program owns its region's dk/dv rows and writes them once.

Why a reverse index and not atomics: the sum for each key is taken in a fixed order, so gradients are
bitwise deterministic from run to run (atomic fp32 adds are not), no fp32 dk/dv buffers or zeroing are
needed, and atomics would cost one read-modify-write of a ``[BLOCK_N, D]`` tile per (query tile, key
tile) pair, which at the paper's settings (8192 keys per query) is as much memory traffic as the matmuls
themselves. The price is recomputing ``q.k`` and ``do.v`` in both backward kernels (7 matmuls instead of
5) and a skew of work: sink regions are selected by every block. The index costs ``O((T/c)*K)`` memory.

Shapes (contiguous): ``q, dq [B, Hq, T, D]``, ``k, dk [B, Hkv, T, D]``, ``v, dv [B, Hkv, T, Dv]``,
``o, do [B, Hq, T, Dv]``, ``lse2, delta [B, Hq, T]`` fp32, ``sel [B, Hq, NB, S]`` int64.

``MOVE`` (``far_positions``, ``kernels/rotary.py``, split head layout): the dq kernel rotates selected keys on
load as the forward kernel does; the dk/dv kernel rotates its region's key tile for each block that selected it
(the slot rank of each selection comes with the reverse index), accumulates that block's dk at the moved
position and rotates it back before adding it up (the transpose of a rotation is the rotation by minus its
angle).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rotary import far_shift, head_columns, rotate, rotation


def reverse_index(sel: torch.Tensor, num_kv_heads: int, num_regions: int, with_slots: bool = False) -> tuple:
    """Who selected each region: ``(offsets [B*Hkv*R + 1], entries [E])`` int32, plus ``slots [E]`` if asked.

    ``entries[offsets[i]:offsets[i+1]]`` lists ``h * NB + blk`` (query head h of the batch element,
    query block blk) for every selection of region ``i % R`` by a query head of kv head
    ``(i // R) % Hkv`` in batch element ``i // (Hkv*R)``. Stable sort: the order (and so the sum order in
    the kernel) is fixed. ``slots[e]`` is the rank of the region in that block's row of ``sel``.
    """
    B, Hq, NB, S = sel.shape
    G = Hq // num_kv_heads
    dev = sel.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
    blk = torch.arange(NB, device=dev).view(1, 1, NB, 1)
    valid = sel >= 0
    key = ((b * num_kv_heads + h // G) * num_regions + sel).expand(B, Hq, NB, S)[valid]
    payload = (h * NB + blk).expand(B, Hq, NB, S)[valid]
    order = torch.sort(key, stable=True).indices
    entries = payload[order].to(torch.int32)
    if with_slots:
        slot = torch.arange(S, device=dev).view(1, 1, 1, S).expand(B, Hq, NB, S)[valid]
        slots = slot[order].to(torch.int32)
    counts = torch.bincount(key, minlength=B * num_kv_heads * num_regions)
    offsets = torch.zeros(B * num_kv_heads * num_regions + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    if with_slots:
        return offsets.to(torch.int32), entries, slots
    return offsets.to(torch.int32), entries


@triton.jit
def ms_attention_delta_kernel(O, DO, DELTA, N, DV, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``delta[i] = sum_d o[i, d] * do[i, d]`` in fp32 over ``N`` rows of ``o, do [N, DV]``; no fp32 copies."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows < N)[:, None] & (cols < DV)[None, :]
    offs = rows[:, None] * DV + cols[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _dq_tile(q, do, lse2, delta, k_ptrs, v_ptrs, kmask, vmask, kv_ok, rows, toks, CAUSAL: tl.constexpr, dq,
             scale_log2e, cos, sin, ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    k = tl.load(k_ptrs, mask=kmask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    if ROTATE:  # far_positions: the key at its moved position (split head layout)
        k = rotate(k, cos, sin, k.shape[0], k.shape[1] // 2)
    v = tl.load(v_ptrs, mask=vmask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DV]
    s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PREC) * scale_log2e
    ok = kv_ok[None, :]
    if CAUSAL:
        ok = ok & (toks[None, :] <= rows[:, None])
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
    dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(DOT_DTYPE), k.to(DOT_DTYPE), input_precision=PREC)


@triton.jit
def ms_attention_dq_kernel(
    Q, K, V, SEL, DO, LSE2, DELTA, DQ, ROT,
    T, NB, S, HQ, G, C, MERGE, MC, D, DV, W, GROUP,
    scale, scale_log2e,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, MOVE: tl.constexpr = 0,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    TILES = tl.cdiv(MC, BLOCK_M)  # query tiles per block
    blk = pid_t // TILES
    tile = pid_t % TILES
    b = bh // HQ
    h = bh % HQ
    bkv = b * (HQ // G) + h // G
    q_base = bh.to(tl.int64) * T * D
    o_base = bh.to(tl.int64) * T * DV
    k_base = bkv.to(tl.int64) * T * D
    v_base = bkv.to(tl.int64) * T * DV

    in_blk = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = blk * MC + in_blk
    blk_end = tl.minimum((blk + 1) * MC, T)
    row_ok = (in_blk < MC) & (rows < T)
    rows64 = rows.to(tl.int64)
    d, d_ok = head_columns(D, BLOCK_D, MOVE != 0)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    q = tl.load(Q + q_base + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    do = tl.load(DO + o_base + rows64[:, None] * DV + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                 other=0.0).to(tl.float32)
    lse2 = tl.load(LSE2 + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    count = tl.minimum(blk * MERGE, S)
    n_keys = count * C
    sel_base = (bh.to(tl.int64) * NB + blk) * S
    n = tl.arange(0, BLOCK_N)
    for start in range(0, n_keys, BLOCK_N):
        j = start + n
        region = tl.load(SEL + sel_base + j // C, mask=j < n_keys, other=-1)
        toks = region * C + j % C
        kv_ok = (j < n_keys) & (region >= 0) & (toks < T)
        toks64 = toks.to(tl.int64)
        cos, sin = 1.0, 0.0
        if MOVE != 0:
            shift = tl.where(kv_ok, far_shift(region, toks, j // C, count, blk, C, MC, W, GROUP, MOVE), 0)
            i = tl.arange(0, BLOCK_D // 2)
            cos, sin = rotation(ROT, shift, i, i < D // 2, C, D // 2, MOVE != 1)  # [BLOCK_N, BLOCK_D // 2]
        dq = _dq_tile(q, do, lse2, delta, K + k_base + toks64[:, None] * D + d[None, :],
                      V + v_base + toks64[:, None] * DV + dv[None, :], kv_ok[:, None] & d_ok[None, :],
                      kv_ok[:, None] & dv_ok[None, :], kv_ok, rows, toks, False, dq, scale_log2e, cos, sin,
                      MOVE != 0, DOT_DTYPE, PREC)

    lo = blk * MC
    hi = tl.minimum(blk * MC + (tile + 1) * BLOCK_M, blk_end)
    for start in range(lo, hi, BLOCK_N):
        toks = start + n
        kv_ok = toks < hi
        toks64 = toks.to(tl.int64)
        dq = _dq_tile(q, do, lse2, delta, K + k_base + toks64[:, None] * D + d[None, :],
                      V + v_base + toks64[:, None] * DV + dv[None, :], kv_ok[:, None] & d_ok[None, :],
                      kv_ok[:, None] & dv_ok[None, :], kv_ok, rows, toks, True, dq, scale_log2e, 1.0, 0.0, False,
                      DOT_DTYPE, PREC)

    tl.store(DQ + q_base + rows64[:, None] * D + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_rows(Q, DO, LSE2, DELTA, qh_base, oh_base, lh_base, row_lo, row_hi, k, v, toks, kv_ok, dk, dv_acc,
               D, DV, CAUSAL: tl.constexpr, scale_log2e,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Add the contribution of query rows ``[row_lo, row_hi)`` of one head to a key tile's dk, dv."""
    d, d_ok = head_columns(D, BLOCK_D, SPLIT)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    for start in range(row_lo, row_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_hi
        rows64 = rows.to(tl.int64)
        q = tl.load(Q + qh_base + rows64[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        do = tl.load(DO + oh_base + rows64[:, None] * DV + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                     other=0.0).to(tl.float32)
        lse2 = tl.load(LSE2 + lh_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + lh_base + rows, mask=row_ok, other=0.0)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PREC) * scale_log2e
        ok = row_ok[:, None] & kv_ok[None, :]
        if CAUSAL:
            ok = ok & (toks[None, :] <= rows[:, None])
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dv_acc += tl.dot(tl.trans(p).to(DOT_DTYPE), do.to(DOT_DTYPE), input_precision=PREC)
        dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(DOT_DTYPE), q.to(DOT_DTYPE), input_precision=PREC)
    return dk, dv_acc


@triton.jit
def ms_attention_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, OFFSETS, ENTRIES, DK, DV_OUT, SLOTS, ROT,
    T, NB, R, HQ, G, C, MERGE, MC, D, DV, S, W, GROUP,
    scale, scale_log2e,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, MOVE: tl.constexpr = 0,
):
    region = tl.program_id(0)
    bkv = tl.program_id(1)
    hkv = HQ // G
    b = bkv // hkv
    g = bkv % hkv
    k_base = bkv.to(tl.int64) * T * D
    v_base = bkv.to(tl.int64) * T * DV
    n = tl.arange(0, BLOCK_N)
    toks = region * C + n
    kv_ok = (n < C) & (toks < T)  # BLOCK_N >= c; the last region may be short
    toks64 = toks.to(tl.int64)
    d, d_ok = head_columns(D, BLOCK_D, MOVE != 0)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    k = tl.load(K + k_base + toks64[:, None] * D + d[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    v = tl.load(V + v_base + toks64[:, None] * DV + dv[None, :], mask=kv_ok[:, None] & dv_ok[None, :],
                other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # Query blocks that selected this region (reverse index), all their rows, no causal mask.
    idx = bkv.to(tl.int64) * R + region
    e_lo = tl.load(OFFSETS + idx)
    e_hi = tl.load(OFFSETS + idx + 1)
    for e in range(e_lo, e_hi):
        entry = tl.load(ENTRIES + e)
        h = entry // NB
        blk = entry % NB
        bh = (b * HQ + h).to(tl.int64)
        if MOVE == 0:
            dk, dv_acc = _dkdv_rows(Q, DO, LSE2, DELTA, bh * T * D, bh * T * DV, bh * T, blk * MC,
                                    tl.minimum((blk + 1) * MC, T), k, v, toks, kv_ok, dk, dv_acc, D, DV, False,
                                    scale_log2e, BLOCK_M, BLOCK_D, BLOCK_DV, DOT_DTYPE, PREC, False)
        else:
            # far_positions: this block sees the keys moved; its dk is rotated back before it is added.
            slot = tl.load(SLOTS + e)
            count = tl.minimum(blk * MERGE, S)
            shift = tl.where(kv_ok, far_shift(region, toks, slot, count, blk, C, MC, W, GROUP, MOVE), 0)
            i = tl.arange(0, BLOCK_D // 2)
            cos, sin = rotation(ROT, shift, i, i < D // 2, C, D // 2, MOVE != 1)  # [BLOCK_N, BLOCK_D // 2]
            dk_moved, dv_acc = _dkdv_rows(Q, DO, LSE2, DELTA, bh * T * D, bh * T * DV, bh * T, blk * MC,
                                          tl.minimum((blk + 1) * MC, T), rotate(k, cos, sin, BLOCK_N, BLOCK_D // 2),
                                          v, toks, kv_ok, tl.zeros([BLOCK_N, BLOCK_D], tl.float32), dv_acc, D, DV,
                                          False, scale_log2e, BLOCK_M, BLOCK_D, BLOCK_DV, DOT_DTYPE, PREC, True)
            dk += rotate(dk_moved, cos, -sin, BLOCK_N, BLOCK_D // 2)

    # The region's own block, every query head of this kv head, causally: rows from the region start on.
    own_end = tl.minimum((region // MERGE + 1) * MC, T)
    for gi in range(0, G):
        bh = (b * HQ + g * G + gi).to(tl.int64)
        dk, dv_acc = _dkdv_rows(Q, DO, LSE2, DELTA, bh * T * D, bh * T * DV, bh * T, region * C, own_end, k, v,
                                toks, kv_ok, dk, dv_acc, D, DV, True, scale_log2e, BLOCK_M, BLOCK_D, BLOCK_DV,
                                DOT_DTYPE, PREC, MOVE != 0)

    tl.store(DK + k_base + toks64[:, None] * D + d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_ok[:, None] & d_ok[None, :])
    tl.store(DV_OUT + v_base + toks64[:, None] * DV + dv[None, :], dv_acc.to(DV_OUT.dtype.element_ty),
             mask=kv_ok[:, None] & dv_ok[None, :])
