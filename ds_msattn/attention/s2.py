"""S2-Attn, LongLoRA's shifted sparse attention (arXiv 2309.12307), fast torch path.

Tensors as for ``scaled_dot_product_attention``: q ``[B, Hq, T, D]``, k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]``
(RoPE already applied, ``Hq % Hkv == 0``), output ``[B, Hq, T, Dv]`` in q's dtype.

The rule (docs/other_methods.md), followed from LongLoRA's public code, ``llama_attn_replace.py`` of
dvlab-research/LongLoRA:

- The sequence is cut into groups of ``G = group_size`` tokens (``int(T * group_ratio)`` when ``group_size`` is
  None: LongLoRA's ``group_size_ratio = 1/4``); each token attends causally inside its own group only.
- The second half of the query heads (``h >= Hq // 2``, after the KV heads are repeated to Hq as LongLoRA's
  ``repeat_kv`` does) uses groups shifted by ``shift`` tokens (default ``G // 2``):
  - ``wrap=True``: ``forward_noflashattn``'s cyclic shift: q, k, v of those heads are rolled by ``-shift``
    (``roll(-G // 2, dims=2)``), grouped in rolled order, attended causally in rolled order, and the output rolled
    back. The last rolled group holds the sequence's last ``shift`` tokens followed by its first ones, so those
    first tokens see the last ones (the information exchange SinkLoRA criticises).
  - ``wrap=False``: ``forward_flashattn``'s layout (``cu_q_lens`` offset by ``group_size // 2``): the shifted groups
    are ``[0, shift)``, ``[shift, shift + G)``, ... in token order, with no wrap.
- LongLoRA requires ``T % G == 0``; here the last group of a layout is simply shorter.

:func:`shifted_sparse_attention` also takes ``sink_tokens`` (every query attends to the first tokens as well):
that is SF-Attn's global attention (``ds_msattn.attention.sf``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: LongLoRA's ``group_size_ratio``: the group is a quarter of the training length.
DEFAULT_GROUP_RATIO = 0.25


def check_shifted_params(group_size: int | None, group_ratio: float, shift: int | None, sink_tokens: int = 0) -> None:
    """ValueError naming the parameter when a value is not allowed (shared by the config and the attention)."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer (tokens) or None, got {group_size!r}")
    if isinstance(group_ratio, bool) or not isinstance(group_ratio, (int, float)) or not 0 < group_ratio <= 1:
        raise ValueError(f"group_ratio must be in (0, 1], got {group_ratio!r}")
    if shift is not None:
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"shift must be a non-negative integer (tokens) or None, got {shift!r}")
        if group_size is not None and shift >= group_size:
            raise ValueError(f"shift must be < group_size={group_size}, got {shift}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be a non-negative integer, got {sink_tokens!r}")


def resolve_group(T: int, group_size: int | None, group_ratio: float, shift: int | None) -> tuple[int, int]:
    """``(G, shift)`` for a sequence of T tokens: G from the ratio when not given, shift ``G // 2`` by default."""
    G = group_size if group_size is not None else max(1, int(T * group_ratio))
    s = G // 2 if shift is None else shift
    if s >= G:
        raise ValueError(f"shift must be < group_size={G} (the group at T={T}), got {s}")
    return G, s


def group_layout(T: int, G: int, offset: int, wrap: bool, device=None) -> tuple[torch.Tensor, int]:
    """Where each token sits in a grouped layout: ``(slots [n_groups * G], front)``.

    ``slots[i]`` is the token at slot i (-1: padding); slot i is in group ``i // G`` and comes after slots
    ``< i`` of its group. ``offset`` is the shift: with ``wrap`` the tokens are rolled by ``-offset``; without,
    ``(G - offset) % G`` padding slots come first so that group 1 starts at token ``offset``.
    """
    tokens = torch.arange(T, device=device)
    front = 0
    if offset and wrap:
        tokens = tokens.roll(-offset)  # slot i holds token (i + offset) % T
    elif offset:
        front = (G - offset) % G
    n = math.ceil((front + T) / G)
    slots = torch.full((n * G,), -1, dtype=torch.long, device=device)
    slots[front : front + T] = tokens
    return slots, front


def _masked_groups(q, k, v, slot_groups: torch.Tensor, slot_of_token: torch.Tensor, G: int, S: int, scale: float):
    """Attention of the groups that need a mask (padding, or sink tokens inside): ``[B, H, m, G, Dv]``.

    ``slot_groups [m, G]``: the token of each slot (-1: padding); slot numbers are ``i * G + r`` of the whole layout.
    """
    m = slot_groups.shape[0]
    valid = slot_groups >= 0
    grouped = [x[:, :, slot_groups.clamp(min=0)] for x in (q, k, v)]  # [B, H, m, G, D]
    order = torch.arange(G, device=q.device)
    # key j visible to query i of the same group: j not padding and j <= i in slot order; a padding query sees
    # itself only (its output is dropped) so that no row is empty
    mask = (order[None, :, None] >= order[None, None, :]) & valid[:, None, :]  # [m, G(query), G(key)]
    mask = mask | (~valid[:, :, None] & (order[:, None] == order[None, :])[None])
    if S:
        sink = torch.arange(S, device=q.device)
        sink_slot = slot_of_token[sink][None, None, :]
        query_slot = torch.where(valid, slot_of_token[slot_groups.clamp(min=0)], -1)  # [m, G]
        # a sink is seen by the queries at or after it (token order) that do not see it inside their own group
        in_group = (sink_slot // G == query_slot[:, :, None] // G) & (sink_slot <= query_slot[:, :, None])
        sink_mask = (sink[None, None, :] <= slot_groups[:, :, None]) & valid[:, :, None] & ~in_group  # [m, G, S]
        grouped[1] = torch.cat([k[:, :, None, :S].expand(-1, -1, m, -1, -1), grouped[1]], dim=3)  # [B, H, m, S+G, D]
        grouped[2] = torch.cat([v[:, :, None, :S].expand(-1, -1, m, -1, -1), grouped[2]], dim=3)
        mask = torch.cat([sink_mask, mask], dim=2)
    return F.scaled_dot_product_attention(*grouped, attn_mask=mask, scale=scale)


def _causal_groups(q, k, v, token_groups: torch.Tensor, S: int, scale: float):
    """Attention of full groups holding no sink token: ``[B, H, m, G, Dv]`` through SDPA's causal kernel.

    With sinks, the S sink keys go first and S placeholder queries before the group's, so that the causal mask
    (query S + i sees keys <= S + i) lets every query see all sinks and its group up to itself.
    """
    B, H = q.shape[:2]
    m, G = token_groups.shape
    qg, kg, vg = (x[:, :, token_groups] for x in (q, k, v))  # [B, H, m, G, D]
    if S:
        qg = torch.cat([qg.new_zeros(B, H, m, S, qg.shape[-1]), qg], dim=3)
        kg = torch.cat([k[:, :, None, :S].expand(-1, -1, m, -1, -1), kg], dim=3)
        vg = torch.cat([v[:, :, None, :S].expand(-1, -1, m, -1, -1), vg], dim=3)
    out = F.scaled_dot_product_attention(qg.flatten(1, 2), kg.flatten(1, 2), vg.flatten(1, 2), is_causal=True,
                                         scale=scale)  # [B, H*m, S+G, Dv]: 4D keeps SDPA's fused CPU/GPU kernels
    return out.unflatten(1, (H, m))[:, :, :, S:]


def _grouped_attention(q, k, v, slots: torch.Tensor, G: int, sinks: int, scale: float) -> torch.Tensor:
    """Causal attention inside the groups of a layout, plus the first ``sinks`` tokens for every later query.

    q ``[B, H, T, D]``, k ``[B, H, T, D]``, v ``[B, H, T, Dv]`` (heads already matched) -> ``[B, H, T, Dv]``.
    """
    T = q.shape[2]
    n = slots.shape[0] // G
    S = min(sinks, T)
    slot_groups = slots.view(n, G)  # [n, G]
    valid = slots >= 0
    slot_of_token = torch.empty(T, dtype=torch.long, device=q.device)
    slot_of_token[slots[valid]] = torch.arange(n * G, device=q.device)[valid]
    special = (slot_groups < 0).any(1) | ((slot_groups >= 0) & (slot_groups < S)).any(1)  # padded or holds a sink
    masked, clean = special.nonzero().squeeze(1), (~special).nonzero().squeeze(1)
    parts = []
    if clean.numel():
        parts.append(_causal_groups(q, k, v, slot_groups[clean], S, scale))
    if masked.numel():
        parts.append(_masked_groups(q, k, v, slot_groups[masked], slot_of_token, G, S, scale))
    out = torch.cat(parts, dim=2)[:, :, torch.argsort(torch.cat([clean, masked]))]  # [B, H, n, G, Dv] in group order
    out = out.flatten(2, 3)[:, :, valid]  # [B, H, T, Dv] in slot order
    return out[:, :, torch.argsort(slots[valid])]  # back to token order


def shifted_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size: int | None = None,
    group_ratio: float = DEFAULT_GROUP_RATIO, shift: int | None = None, wrap: bool = True, sink_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Shifted sparse attention (module docstring); q ``[B, Hq, T, D]`` -> ``[B, Hq, T, Dv]``. Differentiable."""
    check_shifted_params(group_size, group_ratio, shift, sink_tokens)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    G, s = resolve_group(T, group_size, group_ratio, shift)
    scale = D**-0.5 if scale is None else scale
    k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, T, D]
    half = Hq // 2
    parts = []
    for heads, offset in ((slice(0, half), 0), (slice(half, Hq), s)):
        if heads.stop == heads.start:
            continue
        slots, _ = group_layout(T, G, offset, wrap, q.device)
        parts.append(_grouped_attention(q[:, heads], k[:, heads], v[:, heads], slots, G, sink_tokens, scale))
    return torch.cat(parts, dim=1).to(q.dtype)


def s2_attention(q, k, v, *, group_size: int | None = None, group_ratio: float = DEFAULT_GROUP_RATIO,
                 shift: int | None = None, wrap: bool = True, scale: float | None = None) -> torch.Tensor:
    """LongLoRA's S2-Attn: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` -> ``[B, Hq, T, Dv]`` (module docstring)."""
    return shifted_sparse_attention(q, k, v, group_size=group_size, group_ratio=group_ratio, shift=shift, wrap=wrap,
                                    scale=scale)
