"""Region-sharded MS attention across a sequence-parallel group (DESIGN.md, "Sequence-parallel region sharding").

Rank r of a group of P ranks holds the contiguous shard ``[r*Tl, (r+1)*Tl)`` of the global sequence
(global positions), ``Tl`` a multiple of ``m*c`` so that no query block straddles two ranks; the end is
padded and ``valid_len`` says how many global tokens are real. Per layer:

1. all-gather the key summaries ``kbar`` (``[B, Hkv, R, D]`` fp32, tiny);
2. select, for the local query blocks, GLOBAL region ids exactly as :func:`select_regions` does;
3. exchange exactly the selected remote regions: ``all_to_all_single`` of request counts, then of
   request ids ``(batch, kv head, region)``, then the owners reply with those regions' k and v;
4. attention over the fetched regions + the local shard with the lead's fused path
   (:class:`MSAttentionFunction`), whose backward gives dk, dv of the fetched regions; the exchange's
   own ``backward`` sends them back to their owners (the reverse exchange), which accumulate them.

Bytes sent and received per rank and per call are recorded in a :class:`TrafficStats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ds_msattn.attention.options import KeyMover, check_rotary, make_options
from ds_msattn.attention.selection import (
    _validate_params, per_query_head, ranking_queries, select_history, summary_inputs,
)
from ds_msattn.attention.torch_path import MSAttentionFunction


@dataclass
class TrafficStats:
    """Bytes this rank sent / received, one record per region-sharded attention call (one layer).

    Each record: ``kbar`` (all-gather, bytes received from others), ``meta_sent``/``meta_recv`` (counts
    and request ids), ``kv_sent``/``kv_recv`` (forward k and v data), ``grad_sent``/``grad_recv``
    (backward dk and dv; filled when backward runs), ``regions_fetched`` ((batch, kv head, region) triples).
    """

    records: list[dict] = field(default_factory=list)

    def totals(self) -> dict:
        out: dict[str, int] = {}
        for rec in self.records:
            for key, value in rec.items():
                out[key] = out.get(key, 0) + value
        return out

    def clear(self) -> None:
        self.records.clear()


def masked_region_means(x: torch.Tensor, region_size: int, valid: int) -> torch.Tensor:
    """Region means of ``x [B, H, L, D]`` counting only its first ``valid`` tokens -> ``[B, H, L/c, D]`` fp32.

    Equals :func:`region_means` of ``x[:, :, :valid]`` on the regions that hold real tokens (a short last
    region is averaged over what it has); regions of padding only are 0. ``L`` must be a multiple of c.
    """
    B, H, L, D = x.shape
    R = L // region_size
    xf = x.float()
    if valid < L:
        xf = xf.clone()
        xf[:, :, max(valid, 0) :] = 0.0
    sums = xf.view(B, H, R, region_size, D).sum(dim=3)  # [B, H, R, D]
    starts = torch.arange(R, device=x.device) * region_size
    counts = (valid - starts).clamp(min=0, max=region_size).float()
    return sums / counts.clamp(min=1.0)[:, None]


@torch.no_grad()
def select_global(
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    *,
    first_block: int,
    n_real_regions: int,
    top_k: int,
    merge: int,
    sink_regions: int,
) -> torch.Tensor:
    """Selection with global region ids for a run of query blocks, as :func:`select_regions` does.

    Args:
        qbar: ``[B, Hq, nb*m, D]`` query summaries of the local blocks (``[B, Hkv, ...]``, summed per kv
            group, for ``select_per="kv_group"``: the result then has one row per kv head) (regions past ``n_real_regions``
            are replaced by their block's first region, as :func:`select_regions` pads).
        kbar: ``[B, Hkv, Rg, D]`` key summaries of the whole (padded) global sequence.
        first_block: global id of the first local block.
        n_real_regions: R of the unpadded global sequence.

    Returns:
        ``sel [B, Hq, nb, top_k - merge]`` int64 global region ids, ascending, -1 padded.
    """
    B, Hq, Rl, D = qbar.shape
    m = merge
    nb = Rl // m
    budget = top_k - m
    sinks = min(sink_regions, budget)
    n = budget - sinks
    device = qbar.device
    sel = torch.full((B, Hq, nb, budget), -1, dtype=torch.int64, device=device)
    if budget == 0 or nb == 0:
        return sel
    blocks = torch.arange(first_block, first_block + nb, device=device)
    slots = torch.arange(budget, device=device)
    dense = blocks * m <= budget  # short history: select all of it
    for i in torch.nonzero(dense).flatten().tolist():
        hist = int(blocks[i]) * m
        sel[:, :, i, :hist] = slots[:hist]
    sparse = torch.nonzero(~dense).flatten()
    if sparse.numel() == 0:
        return sel
    i0 = int(sparse[0])  # dense blocks come first (history grows with the block id)
    # Pad regions past the real end with the block's first region (same rule as select_regions).
    region_global = first_block * m + torch.arange(Rl, device=device)
    block_first = (torch.arange(Rl, device=device) // m) * m
    src = torch.where(region_global < n_real_regions, torch.arange(Rl, device=device), block_first)
    qbar = qbar.index_select(2, src)
    sel[:, :, i0:] = select_history(
        qbar.view(B, Hq, nb, m, D)[:, :, i0:], kbar, blocks[i0:], merge=m, sinks=sinks, n=n
    )
    return sel


class ExchangePlan:
    """Who asks whom for which ``(batch, kv head, region)``; built from the local selection.

    Attributes (on this rank): ``send_counts [P]`` requests to each owner, ``req_rows`` rows of the
    fetched buffer (``[B*Hkv*F, ...]`` in regions) where each reply lands, in request order,
    ``recv_counts [P]`` requests from each rank, ``serve_rows`` rows of the local ``[B*Hkv*Rl]`` region
    view that the others asked for, in their order; ``F`` fetched regions per (batch, kv head) (max,
    a multiple of m), ``region_map [B, Hkv, Rg]`` global region -> region index in ``[fetched ; local]``.
    """

    def __init__(self, sel: torch.Tensor, *, Hkv: int, Rl: int, rank: int, world: int, merge: int, group):
        B, Hq = sel.shape[:2]
        G = Hq // Hkv
        Rg = Rl * world
        device = sel.device
        self.rank, self.world, self.Rl, self.Rg, self.B, self.Hkv = rank, world, Rl, Rg, B, Hkv
        # need[b, g, j]: kv head g of batch b needs region j (union over the G query heads).
        need = torch.zeros(B, Hkv, Rg + 1, dtype=torch.bool, device=device)
        flat_sel = sel.view(B, Hkv, -1)  # query head h = g*G + gi: the G heads of g are adjacent
        need.scatter_(2, torch.where(flat_sel >= 0, flat_sel, Rg), True)
        need = need[:, :, :Rg]
        owner = torch.arange(Rg, device=device) // Rl
        remote = need & (owner != rank)[None, None, :]
        per_bg = remote.sum(-1)  # [B, Hkv]
        F = int(per_bg.max()) if remote.any() else 0
        F = math.ceil(F / merge) * merge  # whole blocks, so local blocks stay aligned in the buffer
        self.F = F
        slot = remote.long().cumsum(-1) - 1  # position of region j among (b, g)'s fetched regions
        local_index = F + torch.arange(Rg, device=device) - rank * Rl
        self.region_map = torch.where(remote, slot, local_index.expand(B, Hkv, Rg))
        # Requests sorted by owner (then batch, head, region): the order all_to_all_single needs.
        bg, j = torch.nonzero(remote.view(B * Hkv, Rg), as_tuple=True)
        order = torch.argsort(owner[j] * (B * Hkv * Rg) + bg * Rg + j)
        bg, j = bg[order], j[order]
        self.send_counts = torch.bincount(owner[j], minlength=world)
        self.req_rows = bg * F + slot.view(B * Hkv, Rg)[bg, j]
        req_ids = bg * Rg + j  # global id: (batch*Hkv + head) * Rg + region
        self.recv_counts = torch.empty_like(self.send_counts)
        dist.all_to_all_single(self.recv_counts, self.send_counts, group=group)
        self.send_list, self.recv_list = self.send_counts.tolist(), self.recv_counts.tolist()
        served = torch.empty(sum(self.recv_list), dtype=torch.int64, device=device)
        dist.all_to_all_single(served, req_ids, self.recv_list, self.send_list, group=group)
        s_bg, s_j = served // Rg, served % Rg
        self.serve_rows = s_bg * Rl + (s_j - rank * Rl)
        self.meta_sent = 8 * (world - 1) + 8 * req_ids.numel()
        self.meta_recv = 8 * (world - 1) + 8 * served.numel()


class RegionExchange(torch.autograd.Function):
    """Fetch selected remote regions: ``kv [B, Hkv, Tl, E]`` (local shard) -> ``[B, Hkv, F*c, E]``.

    Backward is the reverse exchange: gradients of fetched regions go back to their owners, which add
    them into the gradient of their local shard.
    """

    @staticmethod
    def forward(ctx, kv: torch.Tensor, plan: ExchangePlan, region_size: int, group, record: dict):
        B, Hkv, Tl, E = kv.shape
        c = region_size
        row = c * E
        local = kv.contiguous().view(B * Hkv * plan.Rl, row)
        send = local.index_select(0, plan.serve_rows)
        recv = torch.empty(sum(plan.send_list), row, dtype=kv.dtype, device=kv.device)
        dist.all_to_all_single(recv, send, plan.send_list, plan.recv_list, group=group)
        fetched = torch.zeros(B * Hkv * plan.F, row, dtype=kv.dtype, device=kv.device)
        fetched.index_copy_(0, plan.req_rows, recv)
        record["kv_sent"] = send.numel() * send.element_size()
        record["kv_recv"] = recv.numel() * recv.element_size()
        ctx.plan, ctx.group, ctx.record, ctx.shape = plan, group, record, kv.shape
        return fetched.view(B, Hkv, plan.F * c, E)

    @staticmethod
    def backward(ctx, grad_fetched: torch.Tensor):
        plan, group = ctx.plan, ctx.group
        B, Hkv, Tl, E = ctx.shape
        row = Tl // plan.Rl * E
        g = grad_fetched.contiguous().view(B * Hkv * plan.F, row)
        send = g.index_select(0, plan.req_rows)  # replies travel back to their owners
        recv = torch.empty(sum(plan.recv_list), row, dtype=g.dtype, device=g.device)
        dist.all_to_all_single(recv, send, plan.recv_list, plan.send_list, group=group)
        grad = torch.zeros(B * Hkv * plan.Rl, row, dtype=torch.float32, device=g.device)
        grad.index_add_(0, plan.serve_rows, recv.float())  # several ranks may have asked for one region
        ctx.record["grad_sent"] = send.numel() * send.element_size()
        ctx.record["grad_recv"] = recv.numel() * recv.element_size()
        return grad.to(grad_fetched.dtype).view(B, Hkv, Tl, E), None, None, None, None


def region_sharded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    region_size: int,
    top_k: int,
    merge: int,
    sink_regions: int = 1,
    scale: float | None = None,
    valid_len: int,
    group=None,
    stats: TrafficStats | None = None,
    far_positions: str | None = None,
    far_window: int | None = None,
    far_group: int | None = None,
    score: str | None = None,
    select_per: str | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """MS attention of a sequence sharded over the ranks of ``group`` (this rank's shard in, its output out).

    Args:
        q: ``[B, Hq, Tl, D]`` queries of this rank's shard (global positions, RoPE applied).
        k: ``[B, Hkv, Tl, D]``, v: ``[B, Hkv, Tl, Dv]``. Every rank has the same Tl, a multiple of
            ``region_size * merge``; rank r holds global tokens ``[r*Tl, (r+1)*Tl)``.
        valid_len: real tokens of the global sequence (the rest, at the end, is padding and is ignored:
            the result on real tokens equals ``ms_attention`` of the unpadded sequence).
        group: the sequence-parallel process group (default: the world).
        stats: where to record bytes sent/received.
        far_positions, far_window, far_group, score, select_per, rope_inv_freq: as in ``ms_attention``.
        position_ids: ``[Tl]`` or ``[B, Tl]`` positions of this shard's tokens (global, as the model rotated
            them); default ``r*Tl + arange(Tl)``.

    Returns:
        ``o [B, Hq, Tl, Dv]``; rows of padding tokens are not meaningful.
    """
    _validate_params(region_size, top_k, merge, sink_regions)
    B, Hq, Tl, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    c, m = region_size, merge
    if Tl % (c * m) != 0:
        raise ValueError(f"the local shard length must be a multiple of region_size*merge={c * m}, got {Tl}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if not (0 < valid_len <= world * Tl):
        raise ValueError(f"valid_len must be in [1, {world * Tl}] (P * local length), got {valid_len}")
    if scale is None:
        scale = D**-0.5
    Rl = Tl // c
    record: dict[str, int] = {}
    local_valid = valid_len - rank * Tl
    options = make_options(
        far_positions=far_positions, far_window=far_window, far_group=far_group, score=score, select_per=select_per
    )
    if position_ids is None and options.needs_rotary:
        position_ids = rank * Tl + torch.arange(Tl, device=q.device)
    inv_freq, positions = check_rotary(options, rope_inv_freq, position_ids, B=B, T=Tl, D=D)

    with torch.no_grad():  # selection is not differentiated (as in select_regions)
        qs, ks = summary_inputs(q, k, options, inv_freq, positions)
        # 1. key summaries of every region of the global sequence
        kbar_local = masked_region_means(ks, c, local_valid)  # [B, Hkv, Rl, D]
        kbar_all = torch.empty(world * B, Hkv, Rl, D, dtype=kbar_local.dtype, device=kbar_local.device)
        dist.all_gather_single(kbar_all, kbar_local.contiguous(), group=group)  # gloo: dim 0 grows
        kbar = kbar_all.view(world, B, Hkv, Rl, D).permute(1, 2, 0, 3, 4).reshape(B, Hkv, world * Rl, D)  # [B, Hkv, Rg, D]
        record["kbar"] = kbar_local.numel() * kbar_local.element_size() * (world - 1)

        # 2. global selection for the local blocks
        qbar = ranking_queries(masked_region_means(qs, c, local_valid), Hkv, options)  # [B, Hq or Hkv, Rl, D]
        n_real = math.ceil(valid_len / c)
        sel = per_query_head(select_global(
            qbar, kbar, first_block=rank * (Rl // m), n_real_regions=n_real, top_k=top_k, merge=m,
            sink_regions=sink_regions,
        ), Hq)  # [B, Hq, NBl, K-m]

    # 3. sparse exchange of the selected remote regions' k and v
    plan = ExchangePlan(sel, Hkv=Hkv, Rl=Rl, rank=rank, world=world, merge=m, group=group)
    record["meta_sent"], record["meta_recv"] = plan.meta_sent, plan.meta_recv
    record["regions_fetched"] = len(plan.req_rows)
    kv = torch.cat([k, v], dim=-1)  # one exchange carries both
    fetched = RegionExchange.apply(kv, plan, c, group, record)  # [B, Hkv, F*c, D+Dv]

    # 4. attention over [fetched regions ; local shard]: the fetched part gets dummy query blocks
    # (zeros, no selection) so that the local blocks keep their alignment in the buffer.
    buf = torch.cat([fetched, kv], dim=2)  # [B, Hkv, F*c + Tl, D+Dv]
    kb, vb = buf[..., :D], buf[..., D:]
    F = plan.F
    qb = torch.cat([q.new_zeros(B, Hq, F * c, D), q], dim=2) if F else q
    G = Hq // Hkv
    head_kv = torch.arange(Hq, device=q.device) // G
    mapped = plan.region_map[:, head_kv]  # [B, Hq, Rg]
    sel_buf = torch.where(sel >= 0, torch.gather(mapped, 2, sel.clamp(min=0).flatten(2)).view_as(sel), -1)
    dummy = sel.new_full((B, Hq, F // m, sel.shape[-1]), -1)
    sel_buf = torch.cat([dummy, sel_buf], dim=2)
    mover = None
    if options.moves_keys:  # positions follow the global region ids and global block ids
        mover = KeyMover(options, inv_freq, c, m, positions_sel=torch.cat([dummy, sel], dim=2),
                         block_offset=rank * (Rl // m) - F // m, max_shift=world * Tl)
    out = MSAttentionFunction.apply(qb, kb, vb, sel_buf, c, m, float(scale), mover)
    if stats is not None:
        stats.records.append(record)
    return out[:, :, F * c :]
