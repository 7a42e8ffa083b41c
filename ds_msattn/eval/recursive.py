"""Streaming inference over inputs of any length: MS selection over summaries, exact regions from a store.

DESIGN.md, "Long inputs at inference (streaming mode)". For region size c, merge m, top_k K, sinks s, per layer:

- every complete region's exact k and v (after RoPE) go to a :class:`~ds_msattn.eval.store.RegionStore` (host
  memory up to a budget, then files read with ``preadv``), with the region summaries: ``kbar`` (level 0, one per region)
  and coarser summaries over ``scales[l]`` regions (levels 1..; complete groups only): the mean of their regions'
  ``kbar``, or with ``coarse_score="bound"`` its elementwise max and min. Summaries are means of the rotated keys
  (``score="rope"``) or of the keys with their rotation undone (``score="position_free"``).
- a query block b (history ``H = b*m`` regions) attends, with one softmax, to its own tokens causally and to the
  regions its selection names, read back exactly from the store, at the ``far_positions`` of the options.
- selection (the rule of DESIGN.md, run over candidates found coarse to fine): all of the history while it has
  at most ``K - m`` regions; else the sinks ``0..s'-1`` (``s' = min(s, K-m)``), the ``local_regions`` most recent
  regions, and ``n = K - m - s' - local`` regions chosen by the rank-major merge of the block's query regions'
  rankings (``qbar . kbar``, ties to the lower region) among the candidates:

  * the *window*: regions ``[w0, H)``, ``w0 = floor((H - window_regions) / S) * S`` (at least 0), S the coarsest
    scale: their own ``kbar``;
  * the *far* regions ``[0, w0)``, through the summary levels: every complete group of the coarsest level is
    scored, the rank-major merge keeps ``beam`` of them, their children one level finer are scored, ``beam`` kept,
    and so on down to regions (level 0), whose ``kbar`` then compete with the window's. A coarse group scores
    ``qbar . mean`` (``coarse_score="mean"``) or ``sum_d max(qbar_d max_d, qbar_d min_d)`` (``"bound"``, after Quest's
    page bounds): the latter is never below any of its regions' scores, so a group holding one matching region
    ranks at least as high as that region would, however many unrelated regions it also holds.

  With ``scales=(1,)``, or a window that holds the history, or a beam that keeps every group, the candidates are
  the whole history and this is exactly ``ms_attention`` (tests). The work per block is bounded by the window,
  the beam and the number of coarsest groups (``T / (c * S)``: 256 at 1M tokens with c=16, S=256).
- decoding: a token's own query is its summary (one region of one token), as in
  :mod:`ds_msattn.attention.decode`; the same search and store; generation continues from the prefill's state.

Options (``far_positions`` with ``far_window``/``far_group``, ``score``, ``select_per``) are those of
``ms_attention`` (:mod:`ds_msattn.attention.options`), with the same definitions; the query positions are the
tokens' true indices in the stream.

:class:`RecursiveRunner` runs a Llama-family model (Llama, Mistral, Qwen2) layer by layer through these states:
the next-token NLL of an input of any length (per segment too), prefill tokens/s and a greedy continuation; its
resident memory is bounded by the chunk, the window and the summaries it reads, not by the input length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_msattn.attention.options import MODEL_OPTIONS, key_shifts, make_options, rotate, unrotate
from ds_msattn.attention.selection import _order_key, _validate_params, per_query_head, ranking_queries, region_means

from .store import RegionStore, store_dtype

_MIN = torch.iinfo(torch.int64).min
COARSE_SCORES = ("bound", "mean")


@dataclass
class RecursiveConfig:
    """Streaming runner settings (see module docstring)."""

    region_size: int = 16
    top_k: int = 64
    merge: int = 16
    sink_regions: int = 1
    chunk: int = 1024
    """tokens per forward chunk, a multiple of merge * region_size"""
    window_regions: int = 64
    """most recent history regions scored by their own summary; at least top_k - merge"""
    local_regions: int = 0
    """most recent history regions always attended (inside the top_k - merge budget)"""
    scales: tuple[int, ...] = (1, 16, 256)
    """regions per summary at each level: 1 first, each dividing the next"""
    beam: int = 32
    """summaries kept per coarse level (their children are scored at the next finer level)"""
    coarse_score: str = "bound"
    """how a coarse group (levels 1..) is scored: ``mean`` (query . mean of its regions' summaries) or ``bound``
    (query . the elementwise max or min of its regions' summaries, whichever is larger per dimension: an upper bound
    of every one of its regions' scores, so a single far region that matches is not averaged away)"""
    far_positions: str = MODEL_OPTIONS["far_positions"]
    """options of ms_attention (attention/options.py), defaults as for models (config.ms_attention)"""
    far_window: int = MODEL_OPTIONS["far_window"]
    far_group: int = MODEL_OPTIONS["far_group"]
    score: str = MODEL_OPTIONS["score"]
    select_per: str = MODEL_OPTIONS["select_per"]
    store_dtype: str | None = None
    """float32 | float16 | bfloat16 for the stored k and v (default: the model's dtype)"""
    store_memory_gib: float = 4.0
    """host memory of the store; beyond it, files under store_dir (read with preadv, never mapped)"""
    store_dir: str | None = None
    """directory for the store's files (a temporary sub-directory is made and removed at the end)"""
    keep_store: bool = False
    """leave the store's files in place"""
    store_segment_mib: float = 64.0
    """size of one store segment (the unit of allocation in memory or on disk)"""
    backend: str = "torch"
    """unused (accepted so MS attention parameter dicts can be passed whole)"""

    def __post_init__(self) -> None:
        _validate_params(self.region_size, self.top_k, self.merge, self.sink_regions)
        mc = self.merge * self.region_size
        if self.chunk < mc or self.chunk % mc:
            raise ValueError(f"chunk must be a positive multiple of merge*region_size={mc}, got {self.chunk}")
        budget = self.top_k - self.merge
        if self.window_regions < budget:
            raise ValueError(f"window_regions must be >= top_k - merge = {budget}, got {self.window_regions}")
        most_local = budget - min(self.sink_regions, budget)
        if not 0 <= self.local_regions <= most_local:
            raise ValueError(f"local_regions must be in [0, top_k - merge - sinks] = [0, {most_local}], "
                             f"got {self.local_regions}")
        scales = tuple(self.scales)
        if not scales or scales[0] != 1 or any(b % a or b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must start at 1 and increase, each dividing the next, got {self.scales}")
        self.scales = scales
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")
        if self.coarse_score not in COARSE_SCORES:
            raise ValueError(f"coarse_score must be one of {', '.join(COARSE_SCORES)}, got {self.coarse_score!r}")
        if self.store_memory_gib < 0:
            raise ValueError(f"store_memory_gib must be >= 0, got {self.store_memory_gib}")
        if self.store_dtype is not None:
            store_dtype(self.store_dtype)
        self.options = make_options(far_positions=self.far_positions, far_window=self.far_window,
                                    far_group=self.far_group, score=self.score, select_per=self.select_per)

    def describe(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "options"}
        return out | {"scales": list(self.scales)}


def rank_major(keys: torch.Tensor, n: int) -> torch.Tensor:
    """First ``n`` distinct candidates of the rank-major merge of each query region's ranking -> positions ``[..., n]``.

    ``keys [..., r, N]`` (from ``_order_key``; invalid candidates hold int64 min). Slots beyond the valid
    candidates are -1. With at least n valid candidates this is the rule of ``select_history``.
    """
    *lead, r, N = keys.shape
    ne = min(n, N)
    out = torch.full((*lead, n), -1, dtype=torch.int64, device=keys.device)
    if ne == 0:
        return out
    ranked = keys.topk(ne, dim=-1).indices  # [..., r, ne]
    ok = keys.gather(-1, ranked) != _MIN
    L = ne * r
    stream = ranked.transpose(-1, -2).reshape(*lead, L)
    order = torch.arange(L, device=keys.device).expand_as(stream)
    order = torch.where(ok.transpose(-1, -2).reshape(*lead, L), order, L)
    first = torch.full((*lead, N), L, dtype=torch.int64, device=keys.device)
    first.scatter_reduce_(-1, stream, order, reduce="amin")
    best = first.topk(ne, dim=-1, largest=False)
    out[..., :ne] = torch.where(best.values < L, best.indices, -1)
    return out


def _sorted_ids(ids: torch.Tensor) -> torch.Tensor:
    """Ascending along the last dim with the -1 entries moved to the end."""
    big = torch.iinfo(torch.int64).max
    s = torch.where(ids < 0, big, ids).sort(dim=-1).values
    return torch.where(s == big, -1, s)


def _take(rows: torch.Tensor, ids: torch.Tensor, kv_head: torch.Tensor) -> torch.Tensor:
    """``rows [U, B, Hkv, *E]`` read for ``union`` -> per-head ``[B, Hs, ..., *E]`` at ``ids [B, Hs, ...]`` (positions)."""
    B, Hs = ids.shape[:2]
    bi = torch.arange(B, device=ids.device).view(B, *([1] * (ids.dim() - 1)))
    gi = kv_head.view(1, Hs, *([1] * (ids.dim() - 2)))
    return rows[ids.clamp(min=0), bi, gi]


class LayerState:
    """Streaming attention state of one layer: the store's rows of this layer plus the pending block.

    Shapes ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, *]``. ``inv_freq [D/2]`` (the model's rotary frequencies) is
    needed when an option rotates. ``store`` is shared by the layers of a model (``layer`` names the slice); by
    default the state makes its own at the first chunk.
    """

    def __init__(self, cfg: RecursiveConfig, scale: float, inv_freq: torch.Tensor | None = None,
                 store: RegionStore | None = None, layer: int = 0):
        if cfg.options.needs_rotary and inv_freq is None:
            raise ValueError(f"inv_freq is required with far_positions={cfg.far_positions!r}, score={cfg.score!r}")
        self.cfg, self.scale, self.layer = cfg, scale, layer
        self.inv_freq = None if inv_freq is None else inv_freq.float()
        self.store = store
        self.pending_k = self.pending_v = None  # tokens of the incomplete block
        self.tokens = 0  # tokens seen (the next token's position)
        self.regions = 0  # complete regions in the store

    # ---- store ----------------------------------------------------------------------------------------
    def _ensure_store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.store is None:
            B, Hkv, _, D = k.shape
            self.store = make_store(self.cfg, layers=1, batch=B, kv_heads=Hkv, head_dim=D, value_dim=v.shape[-1],
                                    dtype=k.dtype)

    def _summary_keys(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """What summaries are means of, for ``x [B, H, L, D]`` at positions ``start..``: as given or unrotated (fp32)."""
        x = x.float()
        if self.cfg.score == "rope":
            return x
        pos = torch.arange(start, start + x.shape[2], device=x.device)[None].expand(x.shape[0], -1)
        return unrotate(x, pos, self.inv_freq.to(x.device))

    def _append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Complete regions ``k, v [B, Hkv, r*c, *]`` at token ``start`` -> store rows, level-0 and coarse summaries."""
        c, st, layer = self.cfg.region_size, self.store, self.layer
        B, Hkv, n_tok, D = k.shape
        r = n_tok // c
        r0 = self.regions
        rows = lambda x: x.reshape(B, Hkv, r, c, x.shape[-1]).permute(2, 0, 1, 3, 4)  # noqa: E731  [r, B, Hkv, c, *]
        st["k"].write(layer, r0, rows(k))
        st["v"].write(layer, r0, rows(v))
        kbar = region_means(self._summary_keys(k, start), c)  # [B, Hkv, r, D]
        st["kbar0"].write(layer, r0, kbar.permute(2, 0, 1, 3))
        self.regions = r1 = r0 + r
        for lvl, s in enumerate(self.cfg.scales[1:], start=1):
            g0, g1 = r0 // s, r1 // s
            if g1 > g0:  # groups completed by these regions: their regions' summaries reduced
                fine = st["kbar0"].read(layer, torch.arange(g0 * s, g1 * s))  # [(g1-g0)*s, B, Hkv, D]
                fine = fine.view(g1 - g0, s, *fine.shape[1:])
                if self.cfg.coarse_score == "mean":  # means of their regions' means (all of c tokens)
                    coarse = fine.mean(1)
                else:  # envelope [max, min] per dimension: [g, B, Hkv, 2, D]
                    coarse = torch.stack([fine.amax(1), fine.amin(1)], dim=-2)
                st[f"kbar{lvl}"].write(layer, g0, coarse)

    # ---- selection ------------------------------------------------------------------------------------
    def _select(self, qrank: torch.Tensor, blocks: list[int], Hq: int) -> torch.Tensor:
        """History regions of ``blocks`` -> ``sel [B, Hq, nb, K - m]`` (ascending, -1 padded).

        ``qrank [B, Hs, nb, r, D]`` fp32: the ranking summaries of each block's query regions (Hs = Hq, or Hkv
        for ``select_per="kv_group"``).
        """
        cfg, st, layer = self.cfg, self.store, self.layer
        c, m = cfg.region_size, cfg.merge
        B, Hs, nb, r, D = qrank.shape
        dev = qrank.device
        budget = cfg.top_k - m
        sinks = min(cfg.sink_regions, budget)
        local = cfg.local_regions
        n = budget - sinks - local
        Hkv = st["kbar0"].inner[2]
        kv_head = torch.arange(Hs, device=dev) // (Hs // Hkv) if Hs != Hkv else torch.arange(Hs, device=dev)
        hist = torch.tensor([b * m for b in blocks], device=dev)  # [nb]
        sel = torch.full((B, Hs, nb, budget), -1, dtype=torch.int64, device=dev)
        slots = torch.arange(budget, device=dev)
        dense = hist <= budget
        sel[:, :, dense] = torch.where(slots < hist[dense, None], slots, -1).expand(B, Hs, -1, -1)
        if bool(dense.all()):
            return per_query_head(sel, Hq)
        sp = (~dense).nonzero().flatten()
        q = qrank[:, :, sp]  # [B, Hs, ns, r, D]
        H = hist[sp]  # [ns]
        top = cfg.scales[-1]
        W = cfg.window_regions
        w0 = ((H - W).clamp(min=0) // top) * top if len(cfg.scales) > 1 else torch.zeros_like(H)

        def scores(ids: torch.Tensor, name: str) -> torch.Tensor:
            """qrank . summaries of ``name`` at ``ids [B, Hs, ns, N]`` (any -1) -> order keys ``[B, Hs, ns, r, N]``."""
            valid = ids[ids >= 0]
            if valid.numel() == 0:
                return torch.full((*ids.shape[:3], r, ids.shape[3]), _MIN, dtype=torch.int64, device=dev)
            union = valid.unique()
            rows = st[name].read(layer, union.cpu()).to(dev)  # [U, B, Hkv, D] (or [U, B, Hkv, 2, D]: envelope)
            pos = torch.searchsorted(union, ids.clamp(min=0))
            keys = _take(rows, pos, kv_head).float()  # [B, Hs, ns, N, D] or [B, Hs, ns, N, 2, D]
            if keys.dim() == 5:
                return _order_key(torch.einsum("bhnrd,bhnxd->bhnrx", q, keys))
            # max over the envelope's corners of q . k = q+ . max + q- . min (q- = min(q, 0))
            return _order_key(torch.einsum("bhnrd,bhnxd->bhnrx", q.clamp(min=0), keys[..., 0, :])
                              + torch.einsum("bhnrd,bhnxd->bhnrx", q.clamp(max=0), keys[..., 1, :]))

        # Far candidates, coarse to fine: whole levels of complete groups below w0, then the beam's children.
        cand = None  # [B, Hs, ns, N] ids at the current level
        for lvl in range(len(cfg.scales) - 1, 0, -1):
            s = cfg.scales[lvl]
            if cand is None:
                N = int((w0 // s).max())
                if N == 0:
                    break
                cand = torch.arange(N, device=dev).expand(B, Hs, len(sp), N)
                ok = (cand < (w0 // s)[:, None]) & ((cand + 1) * s > sinks)
                cand = torch.where(ok, cand, -1)
            keys = scores(cand, f"kbar{lvl}").masked_fill_((cand < 0)[:, :, :, None], _MIN)
            pick = rank_major(keys, cfg.beam)  # positions into cand
            chosen = _sorted_ids(torch.where(pick >= 0, cand.gather(-1, pick.clamp(min=0)), -1))
            ratio = s // cfg.scales[lvl - 1]
            kids = chosen[..., None] * ratio + torch.arange(ratio, device=dev)
            cand = torch.where(chosen[..., None] >= 0, kids, -1).flatten(-2)  # [B, Hs, ns, beam*ratio]
        span = int((H - w0).max())  # at most W + top - 1 regions (the whole history with scales (1,))
        win = w0[:, None] + torch.arange(span, device=dev)  # [ns, span]
        win = torch.where((win < H[:, None] - local) & (win >= sinks), win, -1).expand(B, Hs, -1, -1)
        if cand is not None:
            cand = torch.where(cand >= sinks, cand, -1)
            win = torch.cat([cand, win], dim=-1)
        keys = scores(win, "kbar0").masked_fill_((win < 0)[:, :, :, None], _MIN)
        pick = rank_major(keys, n)
        chosen = torch.where(pick >= 0, win.gather(-1, pick.clamp(min=0)), -1)  # [B, Hs, ns, n]
        fixed = [torch.arange(sinks, device=dev).expand(B, Hs, len(sp), sinks)]
        if local:
            fixed.append((H[:, None] - local + torch.arange(local, device=dev)).expand(B, Hs, -1, -1))
        sel[:, :, sp] = _sorted_ids(torch.cat([*fixed, chosen], dim=-1))
        return per_query_head(sel, Hq)

    # ---- attention ------------------------------------------------------------------------------------
    def _attend(self, q: torch.Tensor, sel: torch.Tensor, blocks: list[int], own: list[tuple[torch.Tensor, torch.Tensor]],
                causal: bool) -> list[torch.Tensor]:
        """Each block i: ``q[i] [B, Hq, L_i, D]`` over its selected regions (read in one gather) and ``own[i]``."""
        cfg, st, layer = self.cfg, self.store, self.layer
        c = cfg.region_size
        B, Hq, nb, S = sel.shape
        dev = q[0].device
        valid = sel[sel >= 0]
        hk = hv = None
        if valid.numel():
            union = valid.unique()
            pos = torch.searchsorted(union, sel.clamp(min=0))
            Hkv = st["k"].inner[2]
            kv_head = torch.arange(Hq, device=dev) // (Hq // Hkv)
            hk = _take(st["k"].read(layer, union.cpu()).to(dev), pos, kv_head)  # [B, Hq, nb, S, c, D]
            hv = _take(st["v"].read(layer, union.cpu()).to(dev), pos, kv_head)
            if cfg.options.moves_keys:
                shift = key_shifts(sel, torch.tensor(blocks, device=dev), region_size=c, merge=cfg.merge,
                                   options=cfg.options, per_region=True)  # [B, Hq, nb, S, c or 1]
                hk = rotate(hk.float(), shift, self.inv_freq.to(dev))
        # fp32 attention for fp32 and fp16 models; a bf16 model attends in bf16 (its own dtype: AMX on CPUs)
        work = torch.bfloat16 if q[0].dtype == torch.bfloat16 else torch.float32
        outs = []
        for i, (qi, (own_k, own_v)) in enumerate(zip(q, own)):
            G = Hq // own_k.shape[1]
            L, P = qi.shape[2], own_k.shape[2]
            keys, values = own_k.repeat_interleave(G, 1).to(work), own_v.repeat_interleave(G, 1).to(work)
            mask = torch.ones(L, P, dtype=torch.bool, device=dev).tril(P - L) if causal else None  # [L, P]
            if hk is not None and bool((sel[:, :, i] >= 0).any()):
                keys = torch.cat([hk[:, :, i].reshape(B, Hq, S * c, -1).to(work), keys], 2)
                values = torch.cat([hv[:, :, i].reshape(B, Hq, S * c, -1).to(work), values], 2)
                ok = (sel[:, :, i] >= 0)[..., None].expand(B, Hq, S, c).reshape(B, Hq, 1, S * c)
                own_ok = (mask if mask is not None else torch.ones(L, P, dtype=torch.bool, device=dev))
                if bool(ok.all()):  # one mask for every head
                    mask = torch.cat([torch.ones(L, S * c, dtype=torch.bool, device=dev), own_ok], 1)
                else:
                    mask = torch.cat([ok.expand(B, Hq, L, S * c), own_ok.expand(B, Hq, L, P)], 3)
            # One softmax over the selected regions and the own block (a fused kernel: no [L, keys] scores kept).
            out = F.scaled_dot_product_attention(qi.to(work), keys, values, attn_mask=mask, scale=self.scale)
            outs.append(out.to(qi.dtype))
        return outs

    def _query_summaries(self, q: torch.Tensor, start: int, per_region: bool) -> torch.Tensor:
        """Ranking summaries ``[B, Hs, nb, r, D]`` of the query blocks of ``q [B, Hq, L, D]`` at token ``start``."""
        cfg = self.cfg
        c, m = cfg.region_size, cfg.merge
        Hkv = self.store["kbar0"].inner[2]
        qs = self._summary_keys(q, start)
        if not per_region:  # one decoded token: its own query
            return ranking_queries(qs, Hkv, cfg.options)[:, :, :, None]  # [B, Hs, 1, 1, D]
        qbar = ranking_queries(region_means(qs, c), Hkv, cfg.options)  # [B, Hs, R, D]
        B, Hs, R, D = qbar.shape
        nb = math.ceil(R / m)
        if nb * m > R:  # the last block's missing regions repeat its first (changes nothing in the merge)
            qbar = torch.cat([qbar, qbar[:, :, (nb - 1) * m : (nb - 1) * m + 1].expand(B, Hs, nb * m - R, D)], 2)
        return qbar.view(B, Hs, nb, m, D)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A chunk starting at a block boundary: ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, *]`` -> ``[B, Hq, L, Dv]``."""
        if self.pending_k is not None:
            raise ValueError("prefill chunks must start at a block boundary (chunk a multiple of merge*region_size)")
        self._ensure_store(k, v)
        mc = self.cfg.merge * self.cfg.region_size
        start, L = self.tokens, q.shape[2]
        full = (L // mc) * mc
        if full:  # complete blocks go to the store first; selection only reads regions before each block
            self._append(k[:, :, :full], v[:, :, :full], start)
        b0 = start // mc
        blocks = list(range(b0, b0 + math.ceil(L / mc)))
        sel = self._select(self._query_summaries(q, start, per_region=True), blocks, q.shape[1])
        cuts = [(a, min(L, a + mc)) for a in range(0, L, mc)]
        outs = self._attend([q[:, :, a:e] for a, e in cuts], sel, blocks,
                            [(k[:, :, a:e], v[:, :, a:e]) for a, e in cuts], causal=True)
        if full < L:  # the last, partial block stays pending for decoding
            self.pending_k, self.pending_v = k[:, :, full:].clone(), v[:, :, full:].clone()
        self.tokens += L
        return torch.cat(outs, 2)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token: ``q [B, Hq, 1, D]``, ``k, v [B, Hkv, 1, *]`` -> ``[B, Hq, 1, Dv]`` (per-token rule)."""
        if q.shape[2] != 1:
            raise ValueError(f"decode takes one token at a time, got {q.shape[2]}")
        self._ensure_store(k, v)
        mc = self.cfg.merge * self.cfg.region_size
        self.pending_k = k if self.pending_k is None else torch.cat([self.pending_k, k], 2)
        self.pending_v = v if self.pending_v is None else torch.cat([self.pending_v, v], 2)
        t = self.tokens
        blocks = [t // mc]
        sel = self._select(self._query_summaries(q, t, per_region=False), blocks, q.shape[1])
        out = self._attend([q], sel, blocks, [(self.pending_k, self.pending_v)], causal=False)[0]
        self.tokens += 1
        if self.pending_k.shape[2] == mc:
            self._append(self.pending_k, self.pending_v, self.tokens - mc)
            self.pending_k = self.pending_v = None
        return out

    def state_elements(self) -> int:
        """Tensor elements held in memory besides the store (the pending block)."""
        return sum(t.numel() for t in (self.pending_k, self.pending_v) if t is not None)


def make_store(cfg: RecursiveConfig, *, layers: int, batch: int, kv_heads: int, head_dim: int, value_dim: int,
               dtype: torch.dtype, planned_tokens: int | None = None) -> RegionStore:
    """The region store for ``cfg`` (k, v in the store dtype; fp32 summaries at every level)."""
    c = cfg.region_size
    kv_dtype = store_dtype(cfg.store_dtype) if cfg.store_dtype is not None else store_dtype(dtype)
    arrays = {"k": ((batch, kv_heads, c, head_dim), kv_dtype), "v": ((batch, kv_heads, c, value_dim), kv_dtype)}
    for lvl in range(len(cfg.scales)):
        envelope = lvl > 0 and cfg.coarse_score == "bound"
        arrays[f"kbar{lvl}"] = ((batch, kv_heads, *((2,) if envelope else ()), head_dim), torch.float32)
    planned = None
    if planned_tokens:
        regions = planned_tokens // c
        planned = {"k": regions, "v": regions} | {f"kbar{l}": regions // s for l, s in enumerate(cfg.scales)}
    return RegionStore(layers=layers, arrays=arrays, memory_bytes=int(cfg.store_memory_gib * 2**30),
                       directory=cfg.store_dir, keep=cfg.keep_store, planned_rows=planned,
                       segment_bytes=max(1, int(cfg.store_segment_mib * 2**20)))


class RecursiveRunner:
    """Chunked streaming forward and greedy generation of a Llama-family causal LM over a region store."""

    def __init__(self, model, cfg: RecursiveConfig):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        rope = getattr(model.config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") == "dynamic":
            raise ValueError("streaming mode needs a fixed RoPE base across chunks: use rope none or crd-ntk, not dynamic")
        self.model, self.cfg = model, cfg
        self._rope = apply_rotary_pos_emb
        self.store: RegionStore | None = None
        self.reset()

    def reset(self, planned_tokens: int | None = None) -> None:
        """Empty state (closes the previous store); ``planned_tokens`` checks the disk space up front."""
        if self.store is not None:
            self.store.close()
        inner, config = self.model.model, self.model.config
        hd = inner.layers[0].self_attn.head_dim
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.store = make_store(self.cfg, layers=len(inner.layers), batch=1, kv_heads=kv_heads, head_dim=hd,
                                value_dim=hd, dtype=next(self.model.parameters()).dtype, planned_tokens=planned_tokens)
        inv = inner.rotary_emb.inv_freq.float() if self.cfg.options.needs_rotary else None
        self.states = [LayerState(self.cfg, layer.self_attn.scaling, inv, self.store, i)
                       for i, layer in enumerate(inner.layers)]
        self.position = 0
        self.pending_partial = False

    def _forward(self, ids: torch.Tensor, decode: bool) -> torch.Tensor:
        """``ids [1, L]`` at the next positions -> final hidden states ``[1, L, H]``; updates the states."""
        inner = self.model.model
        B, L = ids.shape
        if B != 1:
            raise ValueError(f"the streaming runner takes one sequence at a time, got batch {B}")
        x = inner.embed_tokens(ids)
        pos = torch.arange(self.position, self.position + L, device=ids.device)[None].expand(B, L)
        cos, sin = inner.rotary_emb(x, pos)
        for layer, state in zip(inner.layers, self.states):
            attn = layer.self_attn
            hd = attn.head_dim
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, L, -1, hd).transpose(1, 2)
            k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)
            v = attn.v_proj(h).view(B, L, -1, hd).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            o = state.decode(q, k, v) if decode else state.prefill(q, k, v)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, L, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.position += L
        return inner.norm(x)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids [1, L]`` (L a multiple of the chunk except for the last call) -> hidden ``[1, L, H]``."""
        return self._forward(ids, decode=False)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token ``[1, 1]`` -> hidden ``[1, 1, H]``."""
        return self._forward(token, decode=True)

    def state_elements(self) -> int:
        return sum(s.state_elements() for s in self.states)

    @torch.no_grad()
    def run(self, ids, new_tokens: int = 0, log=print, on_chunk=None, score: bool = True,
            segment_tokens: int | None = None, planned_tokens: int | None = None, on_segment=None) -> dict:
        """NLL of the input processed chunk by chunk, then ``new_tokens`` greedy tokens.

        ``ids`` is a tensor ``[T]`` or an iterable of chunks ``[chunk]`` (streamed input: nothing of size T is
        ever held). ``score=False`` skips the NLL (only the last position's logits are formed).
        ``segment_tokens`` adds the NLL per segment of that many tokens (``on_segment(record)`` is called as each
        one completes). ``on_chunk(tokens_so_far)`` is called after each chunk. ``planned_tokens`` (the input length, when known) checks the store's disk space first.
        """
        if planned_tokens is None and isinstance(ids, torch.Tensor):
            planned_tokens = int(ids.shape[0]) + new_tokens
        self.reset(planned_tokens)
        head = self.model.get_output_embeddings()
        device = next(self.model.parameters()).device
        if isinstance(ids, torch.Tensor):
            chunks = (ids[a : a + self.cfg.chunk] for a in range(0, ids.shape[0], self.cfg.chunk))
        else:
            chunks = iter(ids)
        total, count, prev, t0, done = 0.0, 0, None, time.perf_counter(), 0
        segments: list[list[float]] = []  # [nll sum, tokens] per segment
        seg_record = lambda s: dict(start=s * segment_tokens, tokens=segments[s][1], nll=segments[s][0] / segments[s][1],  # noqa: E731
                                    ppl=math.exp(segments[s][0] / segments[s][1]))
        reported = 0

        def add(nll: torch.Tensor, first_target: int) -> None:  # per-token NLL of targets first_target..
            nonlocal total, count
            total += float(nll.sum())
            count += nll.numel()
            if segment_tokens:
                idx = torch.arange(first_target, first_target + nll.numel()) // segment_tokens
                for s in idx.unique().tolist():
                    while len(segments) <= s:
                        segments.append([0.0, 0])
                    part = nll[idx == s]
                    segments[s][0] += float(part.sum())
                    segments[s][1] += part.numel()

        for i, chunk in enumerate(chunks):
            chunk = chunk.to(device)
            if chunk.shape[0] != self.cfg.chunk and self.pending_partial:
                raise ValueError("only the last chunk may be shorter than cfg.chunk")
            self.pending_partial = chunk.shape[0] != self.cfg.chunk
            start = done
            done += chunk.shape[0]
            hidden = self.prefill(chunk[None])[0]
            if score:
                if prev is not None:  # the previous chunk's last position predicts this chunk's first token
                    add(F.cross_entropy(head(prev[None]).float(), chunk[:1], reduction="none"), start)
                for a in range(0, chunk.shape[0] - 1, 256):  # logits of 256 positions at a time
                    e = min(chunk.shape[0] - 1, a + 256)
                    add(F.cross_entropy(head(hidden[a:e]).float(), chunk[a + 1 : e + 1], reduction="none"), start + a + 1)
            prev = hidden[-1]
            if score and segment_tokens and on_segment is not None:
                while reported < min(len(segments), done // segment_tokens):
                    on_segment(seg_record(reported))
                    reported += 1
            if on_chunk is not None:
                on_chunk(done)
            if log and i % 16 == 0:
                log(f"stream: {done} tokens, {done / (time.perf_counter() - t0):.0f} tokens/s, "
                    f"store {self.store.disk_bytes / 2**30:.2f} GiB on disk")
        prefill_s = time.perf_counter() - t0
        new = []
        logits = head(prev[None])
        for _ in range(new_tokens):
            token = int(logits[0].argmax())
            new.append(token)
            if len(new) == new_tokens:
                break
            logits = head(self.step(torch.tensor([[token]], device=device))[0])
        out = {
            "tokens": done, "new_tokens": new, "state_elements": self.state_elements(),
            "prefill_seconds": round(prefill_s, 1), "prefill_tokens_per_s": round(done / max(prefill_s, 1e-9), 1),
            "seconds": round(time.perf_counter() - t0, 1), "store_bytes": self.store.nbytes(),
        }
        if score:
            out |= {"nll_per_token": total / max(count, 1), "ppl": math.exp(total / max(count, 1)), "scored_tokens": count}
        if segment_tokens:
            out["segments"] = [seg_record(s) for s in range(len(segments)) if segments[s][1]]
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
