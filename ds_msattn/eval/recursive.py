"""Recursive (bounded-memory) inference: chunked processing with a fixed-size state per layer.

State of one layer (per batch row and kv head), for region size c, merge m, top_k K, sinks s:

- sinks: the first ``min(s, K-m)`` regions, exact (c tokens of k and v each), kept forever;
- window: the most recent ``window_regions`` complete history regions, exact;
- summaries at several scales: a region leaving the window becomes part of a level-0 summary
  (mean k, mean v and token count over ``scales[0]`` regions); when a level holds more than
  ``summary_slots`` entries its oldest ``scales[l+1] / scales[l]`` entries merge into one entry of
  level l+1; the coarsest level merges its two oldest entries. The state never grows past
  ``(sinks + window + m) * c`` tokens plus ``len(scales) * (summary_slots + 1)`` summaries.
- pending: the tokens of the current, incomplete query block (while decoding).

A query block (prefill, block-aligned chunks) attends, with one softmax, to its own tokens
causally, to the sinks and to the window regions selected by the rule of DESIGN.md (block region
means of q score region means of k; rank-major merge), and to the ``summary_top`` summaries the
same rule selects; a summary of n tokens enters as one key ``kbar`` with value ``vbar`` and logit
``q . kbar * scale + log n`` (n equal keys would contribute exactly that).
While decoding, a token uses the per-token rule of :mod:`ds_msattn.attention.decode`.

So while nothing has been summarised (the window holds the whole history), prefill equals
``ms_attention`` and decoding equals ``ms_attention_decode``; tests check both.

:class:`RecursiveRunner` runs a Llama-family model (Llama, Mistral, Qwen2) layer by layer with
these states: the next-token NLL of an input of any length and a greedy continuation, with memory
bounded by the chunk and the state size, not the input length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_msattn.attention.selection import _order_key, _validate_params


@dataclass
class RecursiveConfig:
    """Sizes of the recursive state (see module docstring)."""

    region_size: int = 16
    top_k: int = 64
    merge: int = 16
    sink_regions: int = 1
    chunk: int = 1024
    """tokens per forward chunk, a multiple of merge * region_size"""
    window_regions: int = 64
    """exact history regions kept besides the sinks; at least top_k - merge"""
    scales: tuple[int, ...] = (1, 2, 8)
    """regions per summary at each level, each dividing the next"""
    summary_slots: int = 64
    """summaries kept per level before the oldest merge upwards"""
    summary_top: int = 16
    """summaries a query block (or decoded token) selects"""
    backend: str = "torch"
    """unused (accepted so MS attention parameter dicts can be passed whole)"""

    def __post_init__(self) -> None:
        _validate_params(self.region_size, self.top_k, self.merge, self.sink_regions)
        mc = self.merge * self.region_size
        if self.chunk < mc or self.chunk % mc:
            raise ValueError(f"chunk must be a positive multiple of merge*region_size={mc}, got {self.chunk}")
        if self.window_regions < self.top_k - self.merge:
            raise ValueError(f"window_regions must be >= top_k - merge = {self.top_k - self.merge}, got {self.window_regions}")
        scales = tuple(self.scales)
        if not scales or scales[0] < 1 or any(b % a for a, b in zip(scales, scales[1:])) or list(scales) != sorted(set(scales)):
            raise ValueError(f"scales must be increasing positive integers, each dividing the next, got {self.scales}")
        if self.summary_slots < 2 or self.summary_top < 0:
            raise ValueError(f"summary_slots must be >= 2 and summary_top >= 0, got {self.summary_slots}, {self.summary_top}")
        self.scales = scales


def _rank_major(scores: torch.Tensor, n: int) -> torch.Tensor:
    """First ``n`` distinct candidates of the rank-major merge of each row's top-n -> ``[..., n]`` indices.

    ``scores [..., r, N]`` (r query regions of a block, N candidates, N >= n); ties rank the lower index first.
    """
    *lead, r, N = scores.shape
    ranked = _order_key(scores).topk(n, dim=-1).indices  # [..., r, n]
    stream = ranked.transpose(-1, -2).reshape(*lead, n * r)
    first = torch.full((*lead, N), n * r, dtype=torch.int64, device=scores.device)
    first.scatter_reduce_(-1, stream, torch.arange(n * r, device=scores.device).expand_as(stream), reduce="amin")
    return first.topk(n, dim=-1, largest=False).indices


class LayerState:
    """The bounded attention state of one layer (shapes ``[B, Hkv, tokens, D]``)."""

    def __init__(self, cfg: RecursiveConfig, scale: float):
        self.cfg, self.scale = cfg, scale
        self.sink_count = min(cfg.sink_regions, cfg.top_k - cfg.merge)
        self.sink_k = self.sink_v = None  # first regions, exact
        self.win_k = self.win_v = None  # [B, Hkv, W*c, D] most recent history regions
        self.levels: list[list[torch.Tensor] | None] = [None] * len(cfg.scales)  # [k, v, counts]
        self.partial: list[torch.Tensor] | None = None  # regions waiting to fill a level-0 summary: [k_sum, v_sum, n, regions]
        self.pending_k = self.pending_v = None  # tokens of the incomplete block
        self.regions = 0  # complete history regions so far
        self.summarised = 0  # regions that left the exact state

    # ---- state updates -------------------------------------------------------------------
    def _push_regions(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append complete regions ``[B, Hkv, r*c, D]`` to the history (sinks first, then window)."""
        c = self.cfg.region_size
        r = k.shape[2] // c
        take = min(r, self.sink_count - self.regions) if self.regions < self.sink_count else 0
        if take > 0:
            sk, sv = k[:, :, : take * c], v[:, :, : take * c]
            self.sink_k = sk if self.sink_k is None else torch.cat([self.sink_k, sk], 2)
            self.sink_v = sv if self.sink_v is None else torch.cat([self.sink_v, sv], 2)
            k, v = k[:, :, take * c :], v[:, :, take * c :]
        self.regions += r
        if k.shape[2] == 0:
            return
        self.win_k = k if self.win_k is None else torch.cat([self.win_k, k], 2)
        self.win_v = v if self.win_v is None else torch.cat([self.win_v, v], 2)
        extra = self.win_k.shape[2] // c - self.cfg.window_regions
        if extra > 0:
            old_k, old_v = self.win_k[:, :, : extra * c], self.win_v[:, :, : extra * c]
            self.win_k, self.win_v = self.win_k[:, :, extra * c :].clone(), self.win_v[:, :, extra * c :].clone()
            self._summarise(old_k, old_v)

    def _summarise(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Regions leaving the window -> level-0 summaries of ``scales[0]`` regions each."""
        c, per = self.cfg.region_size, self.cfg.scales[0]
        B, H, n_tok, D = k.shape
        for j in range(n_tok // c):
            ks = k[:, :, j * c : (j + 1) * c].float().sum(2)
            vs = v[:, :, j * c : (j + 1) * c].float().sum(2)
            if self.partial is None:
                self.partial = [ks, vs, c, 1]
            else:
                self.partial = [self.partial[0] + ks, self.partial[1] + vs, self.partial[2] + c, self.partial[3] + 1]
            self.summarised += 1
            if self.partial[3] == per:
                ksum, vsum, cnt, _ = self.partial
                self.partial = None
                self._add_summary(0, ksum[:, :, None] / cnt, vsum[:, :, None] / cnt, torch.tensor([float(cnt)]))

    def _add_summary(self, level: int, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor) -> None:
        counts = counts.to(k.device)
        cur = self.levels[level]
        cur = [k, v, counts] if cur is None else [torch.cat([cur[0], k], 2), torch.cat([cur[1], v], 2), torch.cat([cur[2], counts])]
        self.levels[level] = cur
        if cur[0].shape[2] <= self.cfg.summary_slots:
            return
        last = level == len(self.cfg.scales) - 1
        group = 2 if last else self.cfg.scales[level + 1] // self.cfg.scales[level]
        w = cur[2][:group]  # token counts of the entries merged
        mk = (cur[0][:, :, :group] * w[:, None]).sum(2, keepdim=True) / w.sum()
        mv = (cur[1][:, :, :group] * w[:, None]).sum(2, keepdim=True) / w.sum()
        rest = [cur[0][:, :, group:], cur[1][:, :, group:], cur[2][group:]]
        if last:
            self.levels[level] = [torch.cat([mk, rest[0]], 2), torch.cat([mv, rest[1]], 2), torch.cat([w.sum()[None], rest[2]])]
        else:
            self.levels[level] = rest
            self._add_summary(level + 1, mk, mv, w.sum()[None])

    def summaries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """All summaries, oldest (coarsest) first: ``k [B, Hkv, S, D]``, ``v``, ``log counts [S]``."""
        parts = [lv for lv in reversed(self.levels) if lv is not None]
        if self.partial is not None:  # regions already out of the window but not yet a full summary
            ksum, vsum, cnt, _ = self.partial
            parts.append([ksum[:, :, None] / cnt, vsum[:, :, None] / cnt, torch.tensor([float(cnt)], device=ksum.device)])
        if not parts:
            return None
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2), torch.cat([p[2] for p in parts]).log()

    def state_elements(self) -> int:
        """Number of tensor elements held (for the memory bound)."""
        ts = [self.sink_k, self.sink_v, self.win_k, self.win_v, self.pending_k, self.pending_v]
        ts += [t for lv in self.levels if lv is not None for t in lv]
        if self.partial is not None:
            ts += self.partial[:2]
        return sum(t.numel() for t in ts if t is not None)

    # ---- attention -----------------------------------------------------------------------
    def _history(self, qsum: torch.Tensor, per_token: bool):
        """Selected history keys/values/bias for query summaries ``qsum [B, Hq, r, D]``.

        Returns ``k [B, Hq, X, D]``, ``v [B, Hq, X, Dv]`` and an additive bias ``[B, Hq, X]`` (shared by
        every query of the block), or ``[B, Hq, r, X, *]`` per query when ``per_token``.
        """
        if self.regions == 0:
            return None
        cfg = self.cfg
        c = cfg.region_size
        B, Hq, r, D = qsum.shape
        Hkv = (self.sink_k if self.sink_k is not None else self.win_k).shape[1]
        G = Hq // Hkv
        budget = cfg.top_k - cfg.merge
        ks, vs, bias = [], [], []
        lead = (B, Hq, r) if per_token else (B, Hq)

        def per_head(x):  # [B, Hkv, N, E] -> [B, Hq, N, E]
            return x.repeat_interleave(G, dim=1)

        def expand(x):  # shared [B, Hq, N, E] -> lead + [N, E]
            return x[:, :, None].expand(B, Hq, r, *x.shape[2:]) if per_token else x

        if self.sink_k is not None:
            ks.append(expand(per_head(self.sink_k)))
            vs.append(expand(per_head(self.sink_v)))
            bias.append(qsum.new_zeros(*lead, self.sink_k.shape[2]))
        if self.win_k is not None:
            nw = self.win_k.shape[2] // c
            n = budget - self.sink_count
            if self.regions <= budget or nw <= n:  # whole history fits (dense), or every window region is wanted
                ks.append(expand(per_head(self.win_k)))
                vs.append(expand(per_head(self.win_v)))
                bias.append(qsum.new_zeros(*lead, nw * c))
            elif n > 0:
                kbar = self.win_k.float().view(B, Hkv, nw, c, D).mean(3)  # [B, Hkv, nw, D]
                scores = torch.matmul(qsum.float().view(B, Hkv, G * r, D), kbar.transpose(-1, -2)).view(B, Hq, r, nw)
                if per_token:
                    idx = _order_key(scores).topk(n, dim=-1).indices  # [B, Hq, r, n]
                else:
                    idx = _rank_major(scores, n)  # [B, Hq, n]
                idx = idx.sort(dim=-1).values
                wk = per_head(self.win_k).view(B, Hq, nw, c * D)
                wv = per_head(self.win_v).view(B, Hq, nw, c * self.win_v.shape[-1])
                if per_token:
                    wk, wv = wk[:, :, None].expand(B, Hq, r, nw, -1), wv[:, :, None].expand(B, Hq, r, nw, -1)
                gk = torch.gather(wk, -2, idx[..., None].expand(*idx.shape, wk.shape[-1]))
                gv = torch.gather(wv, -2, idx[..., None].expand(*idx.shape, wv.shape[-1]))
                ks.append(gk.reshape(*lead, n * c, D))
                vs.append(gv.reshape(*lead, n * c, -1))
                bias.append(qsum.new_zeros(*lead, n * c))
        summ = self.summaries()
        if summ is not None and cfg.summary_top > 0:
            sk, sv, logn = summ
            S = sk.shape[2]
            skh, svh = per_head(sk), per_head(sv)
            if S <= cfg.summary_top:
                ks.append(expand(skh.to(qsum.dtype)))
                vs.append(expand(svh.to(qsum.dtype)))
                bias.append(logn.to(qsum.dtype).expand(*lead, S))
            else:
                nt = cfg.summary_top
                scores = torch.matmul(qsum.float().view(B, Hkv, G * r, D), sk.transpose(-1, -2)).view(B, Hq, r, S)
                idx = _order_key(scores).topk(nt, dim=-1).indices if per_token else _rank_major(scores, nt)
                idx = idx.sort(dim=-1).values
                if per_token:
                    skh, svh = skh[:, :, None].expand(B, Hq, r, S, D), svh[:, :, None].expand(B, Hq, r, S, -1)
                    lb = logn.expand(B, Hq, r, S)
                else:
                    lb = logn.expand(B, Hq, S)
                ks.append(torch.gather(skh, -2, idx[..., None].expand(*idx.shape, D)).to(qsum.dtype))
                vs.append(torch.gather(svh, -2, idx[..., None].expand(*idx.shape, svh.shape[-1])).to(qsum.dtype))
                bias.append(torch.gather(lb, -1, idx).to(qsum.dtype))
        if not ks:
            return None
        return torch.cat(ks, -2), torch.cat(vs, -2), torch.cat(bias, -1)

    def _block(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query block (whole, or the last partial one) with the block rule -> ``[B, Hq, L, Dv]``."""
        c = self.cfg.region_size
        B, Hq, L, D = q.shape
        G = Hq // k.shape[1]
        r = math.ceil(L / c)
        pad = r * c - L
        qf = F.pad(q.float(), (0, 0, 0, pad)) if pad else q.float()
        counts = torch.full((r,), float(c), device=q.device)
        counts[-1] = c - pad
        qbar = qf.view(B, Hq, r, c, D).sum(3) / counts[:, None]  # [B, Hq, r, D] region means of q
        hist = self._history(qbar, per_token=False)
        own_k, own_v = k.repeat_interleave(G, 1).float(), v.repeat_interleave(G, 1).float()
        s_own = torch.matmul(q.float(), own_k.transpose(-1, -2)) * self.scale  # [B, Hq, L, L]
        s_own = s_own.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        if hist is None:
            return torch.matmul(torch.softmax(s_own, -1), own_v).to(q.dtype)
        hk, hv, hb = hist
        s_h = torch.matmul(q.float(), hk.float().transpose(-1, -2)) * self.scale + hb.float()[:, :, None]
        p = torch.softmax(torch.cat([s_h, s_own], -1), -1)
        X = hk.shape[2]
        return (torch.matmul(p[..., :X], hv.float()) + torch.matmul(p[..., X:], own_v)).to(q.dtype)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A chunk starting at a block boundary: ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, *]`` -> ``[B, Hq, L, Dv]``."""
        if self.pending_k is not None:
            raise ValueError("prefill chunks must start at a block boundary (chunk a multiple of merge*region_size)")
        mc = self.cfg.merge * self.cfg.region_size
        outs = []
        for a in range(0, q.shape[2], mc):
            e = min(q.shape[2], a + mc)
            outs.append(self._block(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e]))
            if e - a == mc:
                self._push_regions(k[:, :, a:e], v[:, :, a:e])
            else:  # the last, partial block stays pending for decoding
                self.pending_k, self.pending_v = k[:, :, a:e].clone(), v[:, :, a:e].clone()
        return torch.cat(outs, 2)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token: ``q [B, Hq, 1, D]``, ``k, v [B, Hkv, 1, *]`` -> ``[B, Hq, 1, Dv]`` (per-token rule)."""
        if q.shape[2] != 1:
            raise ValueError(f"decode takes one token at a time, got {q.shape[2]}")
        self.pending_k = k if self.pending_k is None else torch.cat([self.pending_k, k], 2)
        self.pending_v = v if self.pending_v is None else torch.cat([self.pending_v, v], 2)
        B, Hq, _, D = q.shape
        G = Hq // k.shape[1]
        own_k = self.pending_k.repeat_interleave(G, 1).float()
        own_v = self.pending_v.repeat_interleave(G, 1).float()
        s_own = torch.matmul(q.float(), own_k.transpose(-1, -2)) * self.scale  # [B, Hq, 1, P]
        hist = self._history(q, per_token=True)  # [B, Hq, 1, X, *]
        if hist is None:
            out = torch.matmul(torch.softmax(s_own, -1), own_v)
        else:
            hk, hv, hb = hist
            s_h = torch.einsum("bhld,bhlxd->bhlx", q.float(), hk.float()) * self.scale + hb.float()
            p = torch.softmax(torch.cat([s_h, s_own], -1), -1)
            X = hk.shape[3]
            out = torch.einsum("bhlx,bhlxd->bhld", p[..., :X], hv.float()) + torch.matmul(p[..., X:], own_v)
        if self.pending_k.shape[2] == self.cfg.merge * self.cfg.region_size:
            self._push_regions(self.pending_k, self.pending_v)
            self.pending_k = self.pending_v = None
        return out.to(q.dtype)


class RecursiveRunner:
    """Chunked, bounded-memory forward and greedy generation of a Llama-family causal LM."""

    def __init__(self, model, cfg: RecursiveConfig):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        rope = getattr(model.config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") == "dynamic":
            raise ValueError("recursive mode needs a fixed RoPE base across chunks: use rope none or crd-ntk, not dynamic")
        self.model, self.cfg = model, cfg
        self._rope = apply_rotary_pos_emb
        self.reset()

    def reset(self) -> None:
        layers = self.model.model.layers
        self.states = [LayerState(self.cfg, layer.self_attn.scaling) for layer in layers]
        self.position = 0
        self.pending_partial = False

    def _forward(self, ids: torch.Tensor, decode: bool) -> torch.Tensor:
        """``ids [B, L]`` at the next positions -> final hidden states ``[B, L, H]``; updates the states."""
        inner = self.model.model
        B, L = ids.shape
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
        """Feed ``ids [B, L]`` (L a multiple of the chunk except for the last call) -> hidden ``[B, L, H]``."""
        return self._forward(ids, decode=False)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``[B, 1]`` -> hidden ``[B, 1, H]``."""
        return self._forward(token, decode=True)

    def state_elements(self) -> int:
        return sum(s.state_elements() for s in self.states)

    @torch.no_grad()
    def run(self, ids, new_tokens: int = 0, log=print, on_chunk=None) -> dict:
        """NLL of the input processed chunk by chunk, then ``new_tokens`` greedy tokens.

        ``ids`` is a tensor ``[T]`` or an iterable of chunks ``[chunk]`` (streamed input: nothing of size T is
        ever held). ``on_chunk(tokens_so_far)`` is called after each chunk (memory checkpoints).
        """
        self.reset()
        head = self.model.get_output_embeddings()
        device = next(self.model.parameters()).device
        if isinstance(ids, torch.Tensor):
            chunks = (ids[a : a + self.cfg.chunk] for a in range(0, ids.shape[0], self.cfg.chunk))
        else:
            chunks = iter(ids)
        total, count, prev, t0, done = 0.0, 0, None, time.perf_counter(), 0
        for i, chunk in enumerate(chunks):
            chunk = chunk.to(device)
            if chunk.shape[0] != self.cfg.chunk and self.pending_partial:
                raise ValueError("only the last chunk may be shorter than cfg.chunk")
            self.pending_partial = chunk.shape[0] != self.cfg.chunk
            done += chunk.shape[0]
            hidden = self.prefill(chunk[None])[0]
            if prev is not None:  # the previous chunk's last position predicts this chunk's first token
                total += float(F.cross_entropy(head(prev[None]).float(), chunk[:1], reduction="sum"))
                count += 1
            if chunk.shape[0] > 1:
                total += float(F.cross_entropy(head(hidden[:-1]).float(), chunk[1:], reduction="sum"))
                count += chunk.shape[0] - 1
            prev = hidden[-1]
            if on_chunk is not None:
                on_chunk(done)
            if log and i % 16 == 0:
                log(f"recursive: {done} tokens, state {self.state_elements()} elements, {time.perf_counter() - t0:.0f} s")
        new = []
        logits = head(prev[None])
        for _ in range(new_tokens):
            token = int(logits[0].argmax())
            new.append(token)
            logits = head(self.step(torch.tensor([[token]], device=device))[0])
        return {
            "nll_per_token": total / max(count, 1), "ppl": math.exp(total / max(count, 1)), "scored_tokens": count,
            "new_tokens": new, "state_elements": self.state_elements(), "seconds": round(time.perf_counter() - t0, 1),
        }
