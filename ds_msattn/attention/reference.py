"""The oracle: MS attention written as plainly as docs/design.md states it, in float64, with loops.

Slow (Python loops over batch, heads and blocks) and only meant for tests on a few hundred tokens.
Differentiable through ordinary autograd (selection is discrete and carries no gradient). Every option
(``far_positions``, ``score``, ``select_per``) is written out here again, token by token, independently of
the vectorised helpers in ``options.py`` that the fast paths share.
"""

from __future__ import annotations

import math

import torch

from .options import MSOptions
from .selection import _validate_params


def _rotate_plain(x: torch.Tensor, angle_positions: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """One vector ``x [D]`` rotated by ``angle_positions`` positions (rotate_half convention), float64."""
    half = x.shape[0] // 2
    angle = angle_positions * inv_freq.double()
    x1, x2 = x[:half], x[half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()])


def _unrotated(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]`` (float64) with each token's rotation undone (angle formed in fp32, as the model does)."""
    out = torch.empty_like(x)
    for bi in range(x.shape[0]):
        for t in range(x.shape[2]):
            angle = (positions[bi, t].float() * inv_freq.float()).double()
            half = x.shape[-1] // 2
            x1, x2 = x[bi, :, t, :half], x[bi, :, t, half:]
            out[bi, :, t] = torch.cat([x1 * angle.cos() + x2 * angle.sin(), x2 * angle.cos() - x1 * angle.sin()], -1)
    return out


def _moved(p: int, r: int, S: int, block_start: int, c: int, options: MSOptions) -> int:
    """Index p' of key p, which lies in the r-th of the block's S selected regions (docs/design.md)."""
    W, G = options.far_window, options.far_group
    if options.far_positions == "exact":
        return p
    if options.far_positions == "compact":
        return block_start - (S - r) * c + p % c
    if options.far_positions == "capped":
        return max(p, block_start - W)
    if p >= block_start - W:  # grouped
        return p
    return block_start - W - math.ceil((block_start - W - p) / G)


def reference_selection(
    q: torch.Tensor, k: torch.Tensor, *, region_size: int, top_k: int, merge: int, sink_regions: int = 1,
    options: MSOptions = MSOptions(), rope_inv_freq: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> list[list[list[list[int]]]]:
    """Selected history regions as nested lists ``[B][Hq][NB] -> sorted region ids``.

    ``positions [B, T]`` (with ``rope_inv_freq``) are needed for ``score="position_free"``.
    """
    _validate_params(region_size, top_k, merge, sink_regions)
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    c, m = region_size, merge
    R = math.ceil(T / c)
    NB = math.ceil(R / m)
    regions = [range(j * c, min((j + 1) * c, T)) for j in range(R)]
    qd, kd = q.detach().double(), k.detach().double()
    if options.score == "position_free":
        qd, kd = _unrotated(qd, positions, rope_inv_freq), _unrotated(kd, positions, rope_inv_freq)
    out = []
    for bi in range(B):
        per_head = []
        for h in range(Hq):
            g = h // G
            # The query summaries that rank for head h: its own, or (kv_group) every head of its group.
            ranking_heads = range(g * G, (g + 1) * G) if options.per_kv_group else [h]
            qbars = [[qd[bi, hh, list(r)].mean(0) for r in regions] for hh in ranking_heads]
            kbar = [kd[bi, g, list(r)].mean(0) for r in regions]
            per_block = []
            for b in range(NB):
                history = list(range(b * m))
                if len(history) <= top_k - m:
                    per_block.append(history)
                    continue
                sinks = min(sink_regions, top_k - m)
                n = top_k - m - sinks
                rest = history[sinks:]
                ranked = []
                for i in range(b * m, min((b + 1) * m, R)):
                    scores = {j: sum(float(qbar[i] @ kbar[j]) for qbar in qbars) for j in rest}
                    ranked.append(sorted(rest, key=lambda j: (-scores[j], j))[:n])
                chosen: list[int] = []
                for rank in range(n):
                    for lst in ranked:
                        if len(chosen) < n and lst[rank] not in chosen:
                            chosen.append(lst[rank])
                per_block.append(sorted(list(range(sinks)) + chosen))
            per_head.append(per_block)
        out.append(per_head)
    return out


def ms_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    region_size: int,
    top_k: int,
    merge: int,
    sink_regions: int = 1,
    scale: float | None = None,
    options: MSOptions = MSOptions(),
    rope_inv_freq: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """MS attention, ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``, ``v [B, Hkv, T, Dv]`` -> ``o [B, Hq, T, Dv]``.

    Computed in float64 and returned in q's dtype. ``rope_inv_freq [D/2]`` and ``positions [B, T]`` as
    :func:`ds_msattn.attention.options.check_rotary` returns them, when the options need them.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    c, m = region_size, merge
    scale = D**-0.5 if scale is None else scale
    selection = reference_selection(
        q, k, region_size=c, top_k=top_k, merge=m, sink_regions=sink_regions, options=options,
        rope_inv_freq=rope_inv_freq, positions=positions,
    )
    qd, kd, vd = q.double(), k.double(), v.double()
    rows = []
    for bi in range(B):
        heads = []
        for h in range(Hq):
            g = h // (Hq // Hkv)
            outs = []
            for b, regions in enumerate(selection[bi][h]):
                start, stop = b * m * c, min((b + 1) * m * c, T)
                selected = [t for j in regions for t in range(j * c, (j + 1) * c)]
                far_keys = [
                    _rotate_plain(kd[bi, g, p], _moved(p, r, len(regions), start, c, options) - p, rope_inv_freq)
                    if options.moves_keys else kd[bi, g, p]
                    for r, j in enumerate(regions) for p in range(j * c, (j + 1) * c)
                ]
                for t in range(start, stop):
                    keys = selected + list(range(start, t + 1))
                    key_vectors = torch.stack(far_keys + [kd[bi, g, p] for p in range(start, t + 1)])
                    s = (key_vectors @ qd[bi, h, t]) * scale
                    outs.append(torch.softmax(s, dim=0) @ vd[bi, g, keys])
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows).to(q.dtype)
