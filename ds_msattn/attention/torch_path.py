"""Fast PyTorch path of MS attention: block-chunked gather + fused attention, recomputing per chunk.

For a chunk of query blocks it gathers the selected regions' keys and values (whole regions, one
``index_select`` of ``c*D`` rows, straight from the kv head: repeated KV heads are never built for
the whole sequence) and attends in two parts that share one softmax: the selected regions (every key
visible) and the block's own tokens (causal). Each part returns its log-sum-exp; the outputs merge
exactly (``o = o1 * exp(l1 - l) + o2 * exp(l2 - l)``, ``l = logaddexp(l1, l2)``). Neither part needs a
mask: chunks group blocks with the same number of selected regions (only the first few blocks, whose
history is short, differ), and the causal part uses the kernel's own causal mode. On CPU both parts are
PyTorch's fused flash kernel; backward calls its fused backward for each part with the merged output
and log-sum-exp, which yields exactly the partial gradients of the one softmax (no forward recompute).
Elsewhere (or when ``Dv != D``) a plain-matmul version does the same in fp32. Gradients of gathered
keys and values are added back with ``index_put_(accumulate=True)`` into fp32 buffers.

Memory: inputs, output, ``lse [B, Hq, T]`` and ``sel [B, Hq, NB, K-m]``, plus one chunk's gathered
tiles (bounded by ``CHUNK_BUDGET`` elements): ``O(T*D + (T/c)*K)``.
"""

from __future__ import annotations

import math

import torch

# Elements of gathered keys (and, on the generic path, of scores) that one chunk may hold.
CHUNK_BUDGET = 1 << 21


def _use_cpu_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the arithmetic of the generic path: fp32, or fp64 where it came in fp64 (the reference's tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _attend(q, k, v, causal: bool, scale: float, fused: bool, mask: torch.Tensor | None = None):
    """``q [N, H, L, D]``, ``k/v [N, H, S, *]`` -> ``(o, lse [N, H, L] fp32)``; causal aligns the last rows.

    ``mask [L, S]`` (instead of ``causal``): additive (0 / -inf) for the fused kernel, boolean (True: attend) otherwise.
    """
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                          scale=scale)
    s = torch.matmul(_wide(q), _wide(k).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), _wide(v)), lse


def _attend_backward(do, q, k, v, o, lse, causal: bool, scale: float, fused: bool):
    """Gradients of one part given the merged output ``o`` and log-sum-exp ``lse`` of the whole softmax."""
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale
        )
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.exp(s - lse[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    return torch.matmul(ds, kf), torch.matmul(ds.transpose(-1, -2), qf), dv


def _merge(o1, l1, o2, l2):
    """Outputs of two parts of one softmax -> ``(o, lse)`` (fp32 arithmetic, fp64 for fp64 parts)."""
    lse = torch.logaddexp(l1, l2)
    o = _wide(o1) * torch.exp(l1 - lse)[..., None]
    return o.addcmul_(_wide(o2), torch.exp(l2 - lse)[..., None]), lse


def shares_groups(sel: torch.Tensor, Hkv: int) -> bool:
    """Whether the ``G = Hq / Hkv`` query heads of every kv head selected the same regions (``select_per="kv_group"``,
    or a selection that happens to agree): then :class:`_Geometry` gathers once per kv head."""
    B, Hq = sel.shape[:2]
    G = Hq // Hkv
    if G == 1:
        return False
    grouped = sel.view(B, Hkv, G, *sel.shape[2:])
    return bool((grouped == grouped[:, :, :1]).all())


class _Geometry:
    """Sizes, chunking and index helpers shared by forward and backward.

    With ``share`` (the query heads of a kv head selected the same regions) the selected part runs per kv head: the
    regions are gathered once for the ``G`` heads, whose queries are stacked into one ``G*m*c``-row tile
    (:meth:`stack`). Longer query tiles also run faster in the CPU flash kernel (256-row tiles from 768 rows on,
    64-row tiles below).
    """

    def __init__(self, q, k, v, sel, region_size, merge, fused, share=False):
        self.B, self.Hq, self.T, self.D = q.shape
        self.Hkv, self.Dv = k.shape[1], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.share = share  # from shares_groups: only where G > 1
        self.Gs = self.G if self.share else 1  # query heads per gathering head
        self.c, self.m = region_size, merge
        self.mc = region_size * merge
        self.NB = sel.shape[2]
        self.S = sel.shape[3]
        self.Tp = self.NB * self.mc
        self.Rp = self.Tp // self.c
        keys = (self.S + self.m) * self.c  # keys per block: selected regions + own block
        width = self.D if fused else max(self.D, self.mc)
        self.chunk = max(1, CHUNK_BUDGET // (self.B * self.Hq * keys * width))
        # Selected regions per block: the same for every batch row and head, filled from the left of the row.
        self.counts = (sel[0, 0] >= 0).sum(-1).tolist()  # [NB]
        # Row offsets of (batch, kv head) in the flattened [B*Hkv*Rp, c*D] view of k and v.
        self.base = (torch.arange(self.B * self.Hkv, device=q.device) * self.Rp).view(self.B, self.Hkv, 1)
        self._workspace: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A scratch tensor of ``shape`` reused by every chunk (one per ``name``; grown when a chunk needs more).

        Gathered tiles are the largest per-chunk temporaries; allocated afresh for each chunk they cost page faults
        on first touch (glibc returns large blocks to the OS): about 1% of a 32K forward+backward on CPU.
        """
        numel = math.prod(shape)
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._workspace[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def chunks(self):
        """Runs of at most ``chunk`` consecutive blocks with equal selection counts -> (b0, b1, count)."""
        b0 = 0
        while b0 < self.NB:
            b1 = b0 + 1
            while b1 < self.NB and b1 - b0 < self.chunk and self.counts[b1] == self.counts[b0]:
                b1 += 1
            yield b0, b1, self.counts[b0]
            b0 = b1

    def rows(self, sel: torch.Tensor, b0: int, b1: int, s: int) -> torch.Tensor:
        """Flat row ids ``[B*Hkv*G*nb*s]`` (``[B*Hkv*nb*s]`` when shared) of the selected regions of blocks b0..b1."""
        idx = sel[:, :: self.Gs, b0:b1, :s].reshape(self.B, self.Hkv, -1)  # [B, Hkv, G*nb*s] or [B, Hkv, nb*s]
        return (idx + self.base).reshape(-1)

    def gather(self, x: torch.Tensor, rows: torch.Tensor, nb: int, s: int, name: str) -> torch.Tensor:
        """Selected regions of ``x [B, Hkv, Tp, E]`` for each query head -> ``[B*Hq, nb, s*c, E]`` (each kv head when
        shared: ``[B*Hkv, nb, s*c, E]``).

        The result lives in the workspace ``name``: it is valid until the next gather into the same name.
        """
        E = x.shape[-1]
        flat = x.view(self.B * self.Hkv * self.Rp, self.c * E)
        out = self.buffer(name, (rows.numel(), self.c * E), x.dtype, x.device)
        torch.index_select(flat, 0, rows, out=out)
        return out.view(-1, nb, s * self.c, E)

    def stack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-query-head rows ``[B*Hq, nb, mc, *E]`` -> per kv head ``[B*Hkv, nb, G*mc, *E]`` when shared (a copy)."""
        if not self.share:
            return x
        nb, rest = x.shape[1], x.shape[3:]
        x = x.reshape(self.B, self.Hkv, self.G, nb, self.mc, *rest).transpose(2, 3)
        return x.reshape(self.B * self.Hkv, nb, self.G * self.mc, *rest)

    def unstack(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`stack`."""
        if not self.share:
            return x
        nb, rest = x.shape[1], x.shape[3:]
        x = x.reshape(self.B, self.Hkv, nb, self.G, self.mc, *rest).transpose(2, 3)
        return x.reshape(self.B * self.Hq, nb, self.mc, *rest)

    def local(self, x: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """Own-block tokens of ``x [B, Hkv, Tp, E]`` for each query head -> ``[B*Hq, nb, mc, E]``."""
        nb, E = b1 - b0, x.shape[-1]
        part = x[:, :, b0 * self.mc : b1 * self.mc].view(self.B, self.Hkv, 1, nb, self.mc, E)
        return part.expand(self.B, self.Hkv, self.G, nb, self.mc, E).reshape(self.B * self.Hq, nb, self.mc, E)

    def add_gathered(self, grad_x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> None:
        """Add ``g [B*Hq or B*Hkv, nb, s*c, E]`` (gradient of :meth:`gather`) into ``grad_x [B, Hkv, Tp, E]``."""
        E = g.shape[-1]
        # index_add_: on CPU (torch 2.13) 1.7-12x faster than index_put_(accumulate=True) for rows of c*E floats
        # (one 32K backward chunk, Hkv 8 and 2: 4.6 vs 8.1 ms, 0.3 vs 5.0 ms).
        flat = grad_x.view(self.B * self.Hkv * self.Rp, self.c * E)
        if not g.is_contiguous() or g.dtype != grad_x.dtype:  # the fused kernel's gradients come head-interleaved
            g = self.buffer("grad", g.shape, grad_x.dtype, g.device).copy_(g)
        flat.index_add_(0, rows, g.view(-1, self.c * E))

    def add_local(self, grad_x: torch.Tensor, g: torch.Tensor, b0: int, b1: int) -> None:
        """Add ``g [B*Hq, nb, mc, E]`` (gradient of :meth:`local`) into ``grad_x [B, Hkv, Tp, E]``."""
        nb, E = b1 - b0, g.shape[-1]
        grad_x[:, :, b0 * self.mc : b1 * self.mc] += g.reshape(self.B, self.Hkv, self.G, nb * self.mc, E).sum(2, dtype=grad_x.dtype)

    def blocks(self, x: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """Query-side rows of blocks b0..b1 of ``x [B, Hq, Tp, E]`` -> ``[B*Hq, nb, mc, E]`` (a view)."""
        return x[:, :, b0 * self.mc : b1 * self.mc].view(self.B * self.Hq, b1 - b0, self.mc, x.shape[-1])


def _pad(x: torch.Tensor, Tp: int) -> torch.Tensor:
    T = x.shape[2]
    return x.contiguous() if T == Tp else torch.nn.functional.pad(x, (0, 0, 0, Tp - T))


class MSAttentionFunction(torch.autograd.Function):
    """Attention over pre-selected regions; ``sel`` comes from :func:`select_regions`."""

    @staticmethod
    def forward(ctx, q, k, v, sel, region_size: int, merge: int, scale: float, mover=None):
        fused = _use_cpu_flash(q, v)
        share = shares_groups(sel, k.shape[1])
        geo = _Geometry(q, k, v, sel, region_size, merge, fused, share)
        qp, kp, vp = (_pad(x, geo.Tp) for x in (q, k, v))
        out = torch.empty(geo.B, geo.Hq, geo.Tp, geo.Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(geo.B, geo.Hq, geo.Tp, dtype=torch.float32, device=q.device)
        for b0, b1, s in geo.chunks():
            qc = geo.blocks(qp, b0, b1)
            oc, lc = _attend(qc, geo.local(kp, b0, b1), geo.local(vp, b0, b1), True, scale, fused)
            if s:
                rows = geo.rows(sel, b0, b1, s)
                ks = geo.gather(kp, rows, b1 - b0, s, "k")
                if mover is not None:  # far_positions: the gathered copies sit at their new positions
                    ks = mover.move(ks, mover.shifts(sel, b0, b1, s, every=geo.Gs))
                o_sel, l_sel = _attend(geo.stack(qc), ks, geo.gather(vp, rows, b1 - b0, s, "v"), False, scale, fused)
                oc, lc = _merge(geo.unstack(o_sel), geo.unstack(l_sel), oc, lc)
            geo.blocks(out, b0, b1).copy_(oc)  # views of `out` / `lse`: write in place
            lse[:, :, b0 * geo.mc : b1 * geo.mc] = lc.reshape(geo.B, geo.Hq, -1)
        if mover is not None:
            mover.release()
        ctx.save_for_backward(q, k, v, sel, out, lse)
        ctx.params = (region_size, merge, scale, fused, mover, share)
        return out if geo.Tp == geo.T else out[:, :, : geo.T].clone()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sel, out, lse = ctx.saved_tensors
        region_size, merge, scale, fused, mover, share = ctx.params
        geo = _Geometry(q, k, v, sel, region_size, merge, fused, share)
        qp, kp, vp = (_pad(x, geo.Tp) for x in (q, k, v))
        dop = _pad(grad_out.to(q.dtype), geo.Tp)
        dq = torch.empty(geo.B, geo.Hq, geo.Tp, geo.D, dtype=q.dtype, device=q.device)
        dk = torch.zeros(geo.B, geo.Hkv, geo.Tp, geo.D, dtype=torch.float32, device=q.device)
        dv = torch.zeros(geo.B, geo.Hkv, geo.Tp, geo.Dv, dtype=torch.float32, device=q.device)
        for b0, b1, s in geo.chunks():
            qc, oc, doc = geo.blocks(qp, b0, b1), geo.blocks(out, b0, b1), geo.blocks(dop, b0, b1)
            lc = lse[:, :, b0 * geo.mc : b1 * geo.mc].reshape(geo.B * geo.Hq, b1 - b0, geo.mc)
            kl, vl = geo.local(kp, b0, b1), geo.local(vp, b0, b1)
            dqc, dkl, dvl = _attend_backward(doc, qc, kl, vl, oc, lc, True, scale, fused)
            geo.add_local(dk, dkl, b0, b1)
            geo.add_local(dv, dvl, b0, b1)
            if s:
                rows = geo.rows(sel, b0, b1, s)
                ks, vs = geo.gather(kp, rows, b1 - b0, s, "k"), geo.gather(vp, rows, b1 - b0, s, "v")
                if mover is not None:
                    shift = mover.shifts(sel, b0, b1, s, every=geo.Gs)
                    ks = mover.move(ks, shift)
                dq_sel, dks, dvs = _attend_backward(*map(geo.stack, (doc, qc)), ks, vs, *map(geo.stack, (oc, lc)),
                                                    False, scale, fused)
                dq_sel = geo.unstack(dq_sel)
                if mover is not None:
                    dks = mover.move_back(dks, shift)
                dqc = dqc.float() + dq_sel.float()
                geo.add_gathered(dk, dks, rows)
                geo.add_gathered(dv, dvs, rows)
            geo.blocks(dq, b0, b1).copy_(dqc)
        if mover is not None:
            mover.release()
        T = geo.T
        return dq[:, :, :T], dk[:, :, :T].to(k.dtype), dv[:, :, :T].to(v.dtype), None, None, None, None, None


def ms_attention_torch(q, k, v, sel, *, region_size: int, merge: int, scale: float, mover=None) -> torch.Tensor:
    """MS attention given the selection ``sel [B, Hq, NB, K-m]``; ``o [B, Hq, T, Dv]``.

    ``mover`` (:class:`ds_msattn.attention.options.KeyMover`) moves the selected keys for ``far_positions``.
    """
    return MSAttentionFunction.apply(q, k, v, sel, region_size, merge, scale, mover)
