"""Triton forward kernel of MS attention: online softmax over selected regions, then the causal local block.

One program per (query tile, batch * query head). A query tile is ``BLOCK_M`` rows of one query block
(block ``b`` holds tokens ``[b*m*c, (b+1)*m*c)``); a block of fewer rows than ``BLOCK_M`` leaves the rest
masked. Keys are visited in tiles of ``BLOCK_N``: first the block's selected regions, flattened to a list
of ``S*c`` keys (slot ``j // c`` of ``sel``, offset ``j % c``; padded ``-1`` slots masked), then the
block's own tokens up to the tile's last row with the causal mask. Scores are kept in base 2
(``scale * log2(e)`` folded in) so the softmax uses ``exp2``; the kernel saves the base-2
log-sum-exp ``lse2 [B, Hq, T]`` for the backward kernels.

``MOVE`` (constexpr, ``rotary.MOVE_CODES``): for ``far_positions`` other than ``exact`` the selected keys are
rotated on load to their new positions (``kernels/rotary.py``: q and k tiles in the split head layout, the
loaded key tile rotated in registers with cos/sin from the table ``ROT``). The own block's keys and every
query stay exact. ``MOVE=0`` compiles the plain kernel.

Shapes (contiguous): ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``, ``v [B, Hkv, T, Dv]``,
``sel [B, Hq, NB, S]`` int64, ``o [B, Hq, T, Dv]``, ``lse2 [B, Hq, T]`` fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rotary import far_shift, head_columns, rotate, rotation


@triton.jit
def _online_tile(q, k_ptrs, v_ptrs, kmask, vmask, kv_ok, rows, toks, CAUSAL: tl.constexpr, m_i, l_i, acc, scale_log2e,
                 cos, sin, ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the online softmax; returns the updated ``(m_i, l_i, acc)``.

    ``ROTATE``: the keys move by the angles ``cos, sin [BLOCK_N, BLOCK_D // 2]`` (split head layout)."""
    k = tl.load(k_ptrs, mask=kmask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    if ROTATE:
        k = rotate(k, cos, sin, k.shape[0], k.shape[1] // 2)
    s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PREC) * scale_log2e  # [BLOCK_M, BLOCK_N]
    ok = kv_ok[None, :]
    if CAUSAL:
        ok = ok & (toks[None, :] <= rows[:, None])
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no key yet keeps m = -inf; subtracting 0 instead avoids inf - inf = nan.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    v = tl.load(v_ptrs, mask=vmask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PREC)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def ms_attention_fwd_kernel(
    Q, K, V, SEL, O, LSE2, ROT,
    T, NB, S, HQ, G, C, MERGE, MC, D, DV, W, GROUP,
    scale_log2e,
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
    hkv = HQ // G
    bkv = b * hkv + h // G
    # int64 bases: B*H*T*D passes 2**31 at long T.
    q_base = bh.to(tl.int64) * T * D
    o_base = bh.to(tl.int64) * T * DV
    k_base = bkv.to(tl.int64) * T * D
    v_base = bkv.to(tl.int64) * T * DV

    in_blk = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = blk * MC + in_blk  # [BLOCK_M] token ids
    blk_end = tl.minimum((blk + 1) * MC, T)
    row_ok = (in_blk < MC) & (rows < T)
    d, d_ok = head_columns(D, BLOCK_D, MOVE != 0)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    q = tl.load(Q + q_base + rows.to(tl.int64)[:, None] * D + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # Selected history regions: a block's row of sel has min(b*m, S) valid slots, padded with -1.
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
        if MOVE != 0:  # far_positions: where these keys sit for this block
            shift = tl.where(kv_ok, far_shift(region, toks, j // C, count, blk, C, MC, W, GROUP, MOVE), 0)
            i = tl.arange(0, BLOCK_D // 2)
            cos, sin = rotation(ROT, shift, i, i < D // 2, C, D // 2, MOVE != 1)  # [BLOCK_N, BLOCK_D // 2]
        m_i, l_i, acc = _online_tile(
            q, K + k_base + toks64[:, None] * D + d[None, :], V + v_base + toks64[:, None] * DV + dv[None, :],
            kv_ok[:, None] & d_ok[None, :], kv_ok[:, None] & dv_ok[None, :], kv_ok, rows, toks, False,
            m_i, l_i, acc, scale_log2e, cos, sin, MOVE != 0, DOT_DTYPE, PREC,
        )

    # Own block, causal: keys from the block start up to this tile's last row.
    lo = blk * MC
    hi = tl.minimum(blk * MC + (tile + 1) * BLOCK_M, blk_end)
    for start in range(lo, hi, BLOCK_N):
        toks = start + n
        kv_ok = toks < hi
        toks64 = toks.to(tl.int64)
        m_i, l_i, acc = _online_tile(
            q, K + k_base + toks64[:, None] * D + d[None, :], V + v_base + toks64[:, None] * DV + dv[None, :],
            kv_ok[:, None] & d_ok[None, :], kv_ok[:, None] & dv_ok[None, :], kv_ok, rows, toks, True,
            m_i, l_i, acc, scale_log2e, 1.0, 0.0, False, DOT_DTYPE, PREC,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # masked rows only: every real row sees itself
    out = acc / l_safe[:, None]
    tl.store(O + o_base + rows.to(tl.int64)[:, None] * DV + dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(LSE2 + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_safe), mask=row_ok)
