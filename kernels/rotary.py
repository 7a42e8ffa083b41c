"""Moving selected keys for ``far_positions`` inside the Triton kernels (rotate on load).

``far_positions`` (docs/design.md, "Options of MS attention beyond the paper") gives every key of a block's
selected history regions a new index ``p'``; an already rotated key moves by one rotation of ``p' - p``
positions. The kernels do that on load, in registers: the key tile is read once, as for ``exact``, and
rotated before its dot with the queries; the dk/dv kernel rotates its gradient back (a rotation is
orthogonal). The shift of each key is computed in-kernel from the block id, the slot rank r, the block's
selected count and W, G (:func:`far_shift`, the formulas of ``options.key_shifts``).

Layout: with moving keys the head dimension of q, k, dq, dk lives in tiles in a *split layout*: columns
``[0, BLOCK_H)`` hold the first half ``d < D/2`` and ``[BLOCK_H, 2*BLOCK_H)`` the second (each padded to a
power of two), so that a rotation (transformers' ``rotate_half`` pairs ``d`` with ``d + D/2``) is a
reshape into the two halves. Dot products are unchanged by the column order as long as both operands use
it; loads and stores map columns to ``d`` (:func:`head_columns`).

Angles: ``cos``/``sin`` of ``shift * inv_freq`` come from a small table built on the host in float64
(:func:`rotation_table`): rows ``[0, c)`` hold angles ``u * f`` and rows ``[c, c + R)`` angles ``a * c * f``,
and ``shift = a*c + u`` is assembled with the angle-addition formulas in fp32. No transcendental runs in the
kernels (fp32 ``sin``/``cos`` of angles of ~1e5 radians would lose ~1e-2), and the table is ``O((R + c) * D)``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: ``far_positions`` -> the kernels' ``MOVE`` constexpr.
MOVE_CODES = {"exact": 0, "compact": 1, "capped": 2, "grouped": 3}


def rotation_table(inv_freq: torch.Tensor, num_regions: int, region_size: int) -> torch.Tensor:
    """``[c + R, 2, D/2]`` fp32: ``[u, 0] = cos(u*f)``, ``[u, 1] = sin(u*f)`` (u < c), then the same for ``a*c*f``."""
    f = inv_freq.double()
    steps = torch.cat([torch.arange(region_size), torch.arange(num_regions) * region_size]).to(f)
    angle = steps[:, None] * f[None, :]  # [c + R, D/2], float64 as options.rotate forms it
    return torch.stack([angle.cos(), angle.sin()], dim=1).float().contiguous()


def split_block(head_dim: int) -> int:
    """``BLOCK_D`` of the split layout: twice the padded half (>= 16 for ``tl.dot``)."""
    return 2 * max(8, triton.next_power_of_2(math.ceil(head_dim / 2)))


@triton.jit
def head_columns(D, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr):
    """``(d, ok)`` of the ``BLOCK_D`` tile columns: plain (``d = col``) or the split layout of the module doc."""
    col = tl.arange(0, BLOCK_D)
    if SPLIT:
        BLOCK_H: tl.constexpr = BLOCK_D // 2
        half = D // 2
        i = col % BLOCK_H
        d = (col // BLOCK_H) * half + i
        ok = i < half
    else:
        d = col
        ok = col < D
    return d, ok


@triton.jit
def far_shift(region, p, slot, count, blk, C, MC, W, GROUP, MOVE: tl.constexpr):
    """``p' - p`` of keys at token ``p`` of ``region`` (slot ``slot`` of block ``blk``'s row of ``count`` valid
    slots), as ``options.key_shifts``: compact ``s_b - (count - r)*c + u``, capped ``max(p, s_b - W)``, grouped
    ``s_b - W - ceil((s_b - W - p) / G)`` below ``s_b - W``. Always ``>= 0``."""
    start = blk * MC
    if MOVE == 1:
        shift = start - (count - slot) * C - region * C
    elif MOVE == 2:
        shift = tl.maximum(start - W - p, 0)
    else:
        edge = start - W
        # edge - p > 0 wherever the value is used, so integer division is a floor here.
        shift = tl.where(p >= edge, 0, edge - (edge - p + GROUP - 1) // GROUP - p)
    return shift


@triton.jit
def rotation(ROT, shift, i, ok, C, HALF, WITH_U: tl.constexpr):
    """``(cos, sin) [len(shift), len(i)]`` of ``shift * inv_freq[i]`` from :func:`rotation_table` (``shift >= 0``,
    columns ``i`` masked by ``ok``). ``WITH_U=False`` when every shift is a multiple of c (compact)."""
    i = i[None, :]
    ok = ok[None, :]
    row = (C + shift // C)[:, None]
    cos = tl.load(ROT + (2 * row) * HALF + i, mask=ok, other=1.0)
    sin = tl.load(ROT + (2 * row + 1) * HALF + i, mask=ok, other=0.0)
    if WITH_U:
        u = (shift % C)[:, None]
        cos_u = tl.load(ROT + (2 * u) * HALF + i, mask=ok, other=1.0)
        sin_u = tl.load(ROT + (2 * u + 1) * HALF + i, mask=ok, other=0.0)
        cos, sin = cos * cos_u - sin * sin_u, sin * cos_u + cos * sin_u
    return cos, sin


@triton.jit
def rotate(x, cos, sin, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the rows of ``x [ROWS, 2*BLOCK_H]`` (split layout) by their angles: ``rotate_half`` RoPE."""
    x1, x2 = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, BLOCK_H]), [0, 2, 1]))
    y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)  # [ROWS, BLOCK_H, 2]
    return tl.reshape(tl.permute(y, [0, 2, 1]), [ROWS, 2 * BLOCK_H])
