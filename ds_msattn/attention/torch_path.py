"""Fast PyTorch path of MS attention: block-chunked gather + fused attention, recomputing per chunk.

For a chunk of query blocks it gathers the selected regions' keys and values (whole regions, one
``index_select`` of ``c*D`` rows, straight from the kv head: repeated KV heads are never built for
the whole sequence), appends the block's own tokens, and runs one attention with an additive mask
(padding of short selections, causality inside the block). On CPU this is PyTorch's fused flash
kernel, which also returns the log-sum-exp, so backward re-gathers the chunk and calls the fused
backward without recomputing the forward. Elsewhere (or when ``Dv != D``) a plain-matmul version
does the same in fp32. Gradients of gathered keys and values are added back with ``index_add_``
into fp32 buffers.

Memory: inputs, output, ``lse [B, Hq, T]`` and ``sel [B, Hq, NB, K-m]``, plus one chunk's gathered
tiles (bounded by ``CHUNK_BUDGET`` elements): ``O(T*D + (T/c)*K)``.
"""

from __future__ import annotations

import torch

# Elements of gathered keys (and, on the generic path, of scores) that one chunk may hold.
CHUNK_BUDGET = 1 << 23


def _use_cpu_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


class _Geometry:
    """Sizes and index tensors shared by forward and backward."""

    def __init__(self, q, k, v, sel, region_size, merge, fused):
        self.B, self.Hq, self.T, self.D = q.shape
        self.Hkv, self.Dv = k.shape[1], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.c, self.m = region_size, merge
        self.mc = region_size * merge
        self.NB = sel.shape[2]
        self.S = sel.shape[3]
        self.Tp = self.NB * self.mc
        self.Rp = self.Tp // self.c
        self.keys = (self.S + self.m) * self.c  # keys per block: selected regions + own block
        width = self.D if fused else max(self.D, self.mc)
        self.chunk = max(1, CHUNK_BUDGET // (self.B * self.Hq * self.keys * width))
        # Valid (non -1) selections per block, the same for every batch row and head; rows are filled from the
        # left and the count never decreases with the block, so a chunk only gathers its last block's count.
        self.counts = (sel[0, 0] >= 0).sum(-1).tolist()  # [NB]
        self.causal = torch.ones(self.mc, self.mc, dtype=torch.bool, device=q.device).tril()
        # Row offsets of (batch, kv head) in the flattened [B*Hkv*Rp, c*D] view of k and v.
        self.base = (torch.arange(self.B * self.Hkv, device=q.device) * self.Rp).view(self.B, self.Hkv, 1)

    def slots(self, b1: int) -> int:
        """Selected regions gathered for a chunk ending at block b1 (its last block has the most)."""
        return self.counts[b1 - 1]

    def mask(self, b0: int, b1: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``[1, nb, mc, keys]``: 0 where attended, -inf elsewhere."""
        nb, s = b1 - b0, self.slots(b1)
        counts = torch.tensor(self.counts[b0:b1], device=self.causal.device)
        sel_ok = torch.arange(s * self.c, device=counts.device)[None, :] // self.c < counts[:, None]  # [nb, s*c]
        allowed = torch.cat(
            [sel_ok[:, None, :].expand(nb, self.mc, s * self.c), self.causal.expand(nb, self.mc, self.mc)], dim=-1
        )
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return out.masked_fill_(~allowed, float("-inf"))[None]

    def rows(self, sel: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """Flat row ids ``[B*Hkv*G*nb*s]`` of the selected regions of blocks b0..b1."""
        idx = sel[:, :, b0:b1, : self.slots(b1)].clamp(min=0).reshape(self.B, self.Hkv, -1)  # [B, Hkv, G*nb*s]
        return (idx + self.base).reshape(-1)

    def gather(self, x: torch.Tensor, rows: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """Selected regions then own block of ``x [B, Hkv, Tp, E]`` -> ``[B*Hq, nb, keys, E]``."""
        nb, E, s = b1 - b0, x.shape[-1], self.slots(b1)
        flat = x.reshape(self.B * self.Hkv * self.Rp, self.c * E)
        picked = flat.index_select(0, rows).view(self.B * self.Hq, nb, s * self.c, E)
        local = x[:, :, b0 * self.mc : b1 * self.mc].reshape(self.B, self.Hkv, 1, nb, self.mc, E)
        local = local.expand(self.B, self.Hkv, self.G, nb, self.mc, E).reshape(self.B * self.Hq, nb, self.mc, E)
        return torch.cat([picked, local], dim=2)  # [B*Hq, nb, (s+m)*c, E]

    def scatter(self, grad_x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, b0: int, b1: int) -> None:
        """Add ``g [B*Hq, nb, keys, E]`` (gradient of :meth:`gather`) into ``grad_x [B, Hkv, Tp, E]``."""
        nb, E, s = b1 - b0, g.shape[-1], self.slots(b1)
        picked = g[:, :, : s * self.c].reshape(-1, self.c * E)
        grad_x.view(self.B * self.Hkv * self.Rp, self.c * E).index_add_(0, rows, picked.to(grad_x.dtype))
        local = g[:, :, s * self.c :].reshape(self.B, self.Hkv, self.G, nb * self.mc, E).sum(2, dtype=grad_x.dtype)
        grad_x[:, :, b0 * self.mc : b1 * self.mc] += local

    def blocks(self, x: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """Query-side rows of blocks b0..b1 of ``x [B, Hq, Tp, E]`` -> ``[B*Hq, nb, mc, E]``."""
        return x[:, :, b0 * self.mc : b1 * self.mc].view(self.B * self.Hq, b1 - b0, self.mc, x.shape[-1])

    def chunks(self):
        for b0 in range(0, self.NB, self.chunk):
            yield b0, min(self.NB, b0 + self.chunk)


def _pad(x: torch.Tensor, Tp: int) -> torch.Tensor:
    T = x.shape[2]
    return x.contiguous() if T == Tp else torch.nn.functional.pad(x, (0, 0, 0, Tp - T))


def _attend_generic(q, k, v, mask, scale):
    """fp32 attention with log-sum-exp: ``q [N, nb, L, D]``, ``k/v [N, nb, S, *]``, additive mask."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + mask
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v.float()), lse


def _attend_generic_backward(do, q, k, v, o, lse, mask, scale):
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    p = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale + mask - lse[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    return torch.matmul(ds, kf), torch.matmul(ds.transpose(-1, -2), qf), dv


class MSAttentionFunction(torch.autograd.Function):
    """Attention over pre-selected regions; ``sel`` comes from :func:`select_regions`."""

    @staticmethod
    def forward(ctx, q, k, v, sel, region_size: int, merge: int, scale: float):
        fused = _use_cpu_flash(q, v)
        geo = _Geometry(q, k, v, sel, region_size, merge, fused)
        qp, kp, vp = (_pad(x, geo.Tp) for x in (q, k, v))
        out = torch.empty(geo.B, geo.Hq, geo.Tp, geo.Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(geo.B, geo.Hq, geo.Tp, dtype=torch.float32, device=q.device)
        mask_dtype = q.dtype if fused else torch.float32
        for b0, b1 in geo.chunks():
            rows = geo.rows(sel, b0, b1)
            qc, kc, vc = geo.blocks(qp, b0, b1), geo.gather(kp, rows, b0, b1), geo.gather(vp, rows, b0, b1)
            mask = geo.mask(b0, b1, mask_dtype)
            if fused:
                oc, lc = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qc, kc, vc, 0.0, False, attn_mask=mask, scale=scale
                )
            else:
                oc, lc = _attend_generic(qc, kc, vc, mask, scale)
            geo.blocks(out, b0, b1).copy_(oc)  # views of `out` / `lse`: write in place
            lse[:, :, b0 * geo.mc : b1 * geo.mc] = lc.reshape(geo.B, geo.Hq, -1)
        ctx.save_for_backward(q, k, v, sel, out, lse)
        ctx.params = (region_size, merge, scale, fused)
        return out if geo.Tp == geo.T else out[:, :, : geo.T].clone()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sel, out, lse = ctx.saved_tensors
        region_size, merge, scale, fused = ctx.params
        geo = _Geometry(q, k, v, sel, region_size, merge, fused)
        qp, kp, vp = (_pad(x, geo.Tp) for x in (q, k, v))
        dop = _pad(grad_out.to(q.dtype).contiguous(), geo.Tp)
        dq = torch.empty(geo.B, geo.Hq, geo.Tp, geo.D, dtype=q.dtype, device=q.device)
        dk = torch.zeros(geo.B, geo.Hkv, geo.Tp, geo.D, dtype=torch.float32, device=q.device)
        dv = torch.zeros(geo.B, geo.Hkv, geo.Tp, geo.Dv, dtype=torch.float32, device=q.device)
        mask_dtype = q.dtype if fused else torch.float32
        for b0, b1 in geo.chunks():
            rows = geo.rows(sel, b0, b1)
            qc, kc, vc = geo.blocks(qp, b0, b1), geo.gather(kp, rows, b0, b1), geo.gather(vp, rows, b0, b1)
            oc, doc = geo.blocks(out, b0, b1), geo.blocks(dop, b0, b1)
            lc = lse[:, :, b0 * geo.mc : b1 * geo.mc].reshape(geo.B * geo.Hq, b1 - b0, geo.mc)
            mask = geo.mask(b0, b1, mask_dtype)
            if fused:
                dqc, dkc, dvc = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    doc, qc, kc, vc, oc, lc, 0.0, False, attn_mask=mask, scale=scale
                )
            else:
                dqc, dkc, dvc = _attend_generic_backward(doc, qc, kc, vc, oc, lc, mask, scale)
            geo.blocks(dq, b0, b1).copy_(dqc)
            geo.scatter(dk, dkc, rows, b0, b1)
            geo.scatter(dv, dvc, rows, b0, b1)
        T = geo.T
        return dq[:, :, :T], dk[:, :, :T].to(k.dtype), dv[:, :, :T].to(v.dtype), None, None, None, None


def ms_attention_torch(q, k, v, sel, *, region_size: int, merge: int, scale: float) -> torch.Tensor:
    """MS attention given the selection ``sel [B, Hq, NB, K-m]``; ``o [B, Hq, T, Dv]``."""
    return MSAttentionFunction.apply(q, k, v, sel, region_size, merge, scale)
