"""The oracle for S2-Attn and SF-Attn: which keys each query sees, token by token, in float64.

Written from the rules of docs/other_methods.md without the slot layouts of ``s2.py``: a plain function
:func:`visible` says whether token t of head h sees token j, and attention is a masked softmax over those keys.
Slow (Python loops over heads and token pairs); for tests on a few dozen tokens. Differentiable through autograd.
"""

from __future__ import annotations

import torch

from .s2 import DEFAULT_GROUP_RATIO, check_shifted_params, resolve_group


def visible(t: int, j: int, *, T: int, G: int, shift: int, shifted_head: bool, wrap: bool, sinks: int) -> bool:
    """Does query token t see key token j?"""
    if j < sinks and j <= t:  # SF-Attn's global sink tokens (causal)
        return True
    if not shifted_head or shift == 0:
        return t // G == j // G and j <= t
    if wrap:
        # LongLoRA's roll(-shift): token x sits at place (x - shift) mod T of the rolled sequence; groups of G
        # places, causal in place order
        place_t, place_j = (t - shift) % T, (j - shift) % T
        return place_t // G == place_j // G and place_j <= place_t
    # no wrap: groups [0, shift), [shift, shift + G), ...
    group = lambda x: 0 if x < shift else 1 + (x - shift) // G  # noqa: E731
    return group(t) == group(j) and j <= t


def shifted_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size: int | None = None,
    group_ratio: float = DEFAULT_GROUP_RATIO, shift: int | None = None, wrap: bool = True, sink_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` -> ``[B, Hq, T, Dv]`` float64 (S2-Attn; SF-Attn with
    ``wrap=False`` and ``sink_tokens``)."""
    check_shifted_params(group_size, group_ratio, shift, sink_tokens)
    B, Hq, T, D = q.shape
    rep = Hq // k.shape[1]
    G, s = resolve_group(T, group_size, group_ratio, shift)
    scale = D**-0.5 if scale is None else scale
    heads = []
    for h in range(Hq):
        rule = dict(T=T, G=G, shift=s, shifted_head=h >= Hq // 2, wrap=wrap, sinks=sink_tokens)
        mask = torch.tensor([[visible(t, j, **rule) for j in range(T)] for t in range(T)])
        qh, kh, vh = q[:, h].double(), k[:, h // rep].double(), v[:, h // rep].double()  # [B, T, D]
        scores = (qh @ kh.transpose(-1, -2)) * scale  # [B, T, T]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        heads.append(probs @ vh)
    return torch.stack(heads, dim=1)
