"""The oracle for ESA (:mod:`ds_msattn.attention.esa`): the rule written out token by token, in float64.

No batched selection, no gathers: for each batch row, chunk and selection group a Python list of middle-token scores
follows equations 3, 4 and 8 of the paper literally (sums over heads as Python sums, the proximity window as a
Python max), the top-k is a sort by (-score, token), and each query's output is a softmax over an explicit list of
(key, position kind) pairs. The rotation to fixed positions uses the shared helpers of
:mod:`ds_msattn.attention.options` (tested on their own). Slow; for tests on a few dozen tokens.
"""

from __future__ import annotations

import torch

from .esa import check_esa_inputs, make_params


def esa_attention_reference(q, k, v, *, projection=None, rope_inv_freq=None, position_ids=None, scale=None,
                            return_selection: bool = False, **kwargs):
    """q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` -> ``[B, Hq, Tq, Dv]`` float64 (keywords as ``esa_attention``).

    With ``return_selection`` also the selected middle tokens: ``{(b, chunk_start, group): [tokens]}``.
    """
    params = make_params(**kwargs)
    scale, inv_freq, positions = check_esa_inputs(q, k, v, scale, params, rope_inv_freq, position_ids)
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep, offset = Hq // Hkv, Tk - Tq
    if params.far_positions == "fixed":
        from .options import rotate, unrotate

        q_pos = positions[:, offset:].double()
        q_far = rotate(q, (params.distance - q_pos)[:, None, :], inv_freq.double())
        k_far = unrotate(k, positions, inv_freq).double()
    else:
        q_far, k_far = q, k
    groups = [list(range(Hkv))] if params.select_per == "layer" else [[g] for g in range(Hkv)]
    proj = None if projection is None else [p.double() for p in projection]

    def query_vector(b, t, group, gi):
        # sum of the query heads of each kv head of the group, concatenated (kv head major), projected
        vec = torch.cat([sum(q_far[b, g * rep + r, t] for r in range(rep)) for g in group])
        return vec if proj is None else vec @ proj[0][gi]

    def key_vector(b, j, group, gi):
        vec = torch.cat([k_far[b, g, j] for g in group])
        return vec if proj is None else vec @ proj[1][gi]

    out = torch.zeros(B, Hq, Tq, v.shape[-1], dtype=torch.float64)
    chosen = {}
    for b in range(B):
        for c0 in range(0, Tq, params.chunk_size):
            c1 = min(Tq, c0 + params.chunk_size)
            a = offset + c0
            sinks = list(range(min(params.sink_tokens, a)))
            local_start = max(len(sinks), a - params.local_window)
            middle = list(range(len(sinks), local_start))
            for gi, group in enumerate(groups):
                selected = []
                if middle and params.top_k:
                    keys = [key_vector(b, m, group, gi) for m in middle]
                    best = [float("-inf")] * len(middle)
                    for t in range(c0, c1):
                        qv = query_vector(b, t, group, gi)
                        f = [float(qv @ kv) for kv in keys]
                        top = max(f)
                        best = [max(old, x - top) for old, x in zip(best, f)]  # eq. 4: max over c of f - max f
                    eps = params.proximity
                    near = [max(best[max(0, i - eps): i + eps + 1]) for i in range(len(middle))]  # eq. 8
                    ranked = sorted(range(len(middle)), key=lambda i: (-near[i], i))
                    selected = sorted(middle[i] for i in ranked[: params.top_k])
                chosen[(b, a, gi)] = selected
                for g in group:
                    for h in range(g * rep, (g + 1) * rep):
                        for t in range(c0, c1):
                            pos = offset + t
                            pairs = [(q_far[b, h, t] @ k_far[b, g, j], j) for j in sinks + selected]
                            pairs += [(q[b, h, t] @ k[b, g, j], j) for j in range(local_start, pos + 1)]
                            logits = torch.stack([x for x, _ in pairs]) * scale
                            p = torch.softmax(logits, dim=0)
                            out[b, h, t] = sum(w * v[b, g, j] for w, (_, j) in zip(p, pairs))
    return (out, chosen) if return_selection else out
