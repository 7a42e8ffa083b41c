"""The oracle for H2O eviction: one layer's attention over a whole input, simulated step by step in float64.

No cache object and no tensor gathering: for each batch row and kv head a Python set of kept token positions and a
dict of scores follow the rule of :mod:`ds_msattn.eval.h2o` literally. Because a layer's cache depends only on that
layer's own attention, running this in every layer of a model over the full input (``Tq == Tk``) gives what the
step-by-step cache gives. Slow; for tests on a few dozen tokens.
"""

from __future__ import annotations

import torch


def h2o_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, steps: list[int], budget: int,
                            recent: int, scale: float | None = None) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``; ``steps``: sizes of the consecutive steps (sum T).

    Returns (output ``[B, Hq, T, Dv]`` float64, kept positions ``[B][Hkv]`` after the last step).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    assert sum(steps) == T
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, Hq, T, v.shape[-1], dtype=torch.float64)
    kept_all = []
    for b in range(B):
        kept_rows = []
        for g in range(Hkv):
            kept: list[int] = []
            score: dict[int, float] = {}
            start = 0
            for size in steps:
                step = list(range(start, start + size))
                for t in step:
                    keys = kept + [j for j in step if j <= t]
                    for h in range(g * rep, (g + 1) * rep):
                        logits = torch.stack([q[b, h, t].double() @ k[b, g, j].double() for j in keys]) * scale
                        probs = torch.softmax(logits, dim=0)
                        out[b, h, t] = sum(p * v[b, g, j].double() for p, j in zip(probs, keys))
                        for p, j in zip(probs.tolist(), keys):
                            score[j] = score.get(j, 0.0) + p
                cached = kept + step
                if len(cached) > budget:
                    tail = cached[len(cached) - recent:] if recent else []
                    older = cached[: len(cached) - recent]
                    heavy = sorted(older, key=lambda j: (-score[j], j))[: budget - recent]
                    cached = sorted(heavy) + tail
                    score = {j: score[j] for j in cached}
                kept = cached
                start += size
            kept_rows.append(kept)
        kept_all.append(kept_rows)
    return out, kept_all
