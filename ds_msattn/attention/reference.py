"""The oracle: MS attention written as plainly as DESIGN.md states it, in float64, with loops.

Slow (Python loops over batch, heads and blocks) and only meant for tests on a few hundred tokens.
Differentiable through ordinary autograd (selection is discrete and carries no gradient).
"""

from __future__ import annotations

import math

import torch

from .selection import _validate_params


def reference_selection(
    q: torch.Tensor, k: torch.Tensor, *, region_size: int, top_k: int, merge: int, sink_regions: int = 1
) -> list[list[list[list[int]]]]:
    """Selected history regions as nested lists ``[B][Hq][NB] -> sorted region ids``."""
    _validate_params(region_size, top_k, merge, sink_regions)
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    c, m = region_size, merge
    R = math.ceil(T / c)
    NB = math.ceil(R / m)
    regions = [range(j * c, min((j + 1) * c, T)) for j in range(R)]
    qd, kd = q.detach().double(), k.detach().double()
    out = []
    for bi in range(B):
        per_head = []
        for h in range(Hq):
            g = h // (Hq // Hkv)
            qbar = [qd[bi, h, list(r)].mean(0) for r in regions]
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
                    scores = {j: float(qbar[i] @ kbar[j]) for j in rest}
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
) -> torch.Tensor:
    """MS attention, ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``, ``v [B, Hkv, T, Dv]`` -> ``o [B, Hq, T, Dv]``.

    Computed in float64 and returned in q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    c, m = region_size, merge
    scale = D**-0.5 if scale is None else scale
    selection = reference_selection(q, k, region_size=c, top_k=top_k, merge=m, sink_regions=sink_regions)
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
                for t in range(start, stop):
                    keys = selected + list(range(start, t + 1))
                    s = (kd[bi, g, keys] @ qd[bi, h, t]) * scale
                    outs.append(torch.softmax(s, dim=0) @ vd[bi, g, keys])
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows).to(q.dtype)
