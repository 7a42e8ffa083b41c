"""Autograd function and functional wrapper around the Triton MS attention kernels.

Region selection arrives here as ``sel``: from :func:`ds_msattn.attention.select_regions` (PyTorch) or, for
``backend="triton"`` on CUDA, from the selection kernel (``kernels/select.py``), which gives the same ``sel``
except where two scores differ only in fp32 rounding. The kernels here do the attention.

Tile sizes: on a GPU the kernels are autotuned over a few configurations (powers of two >= 16); under the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) autotuning cannot run, so plain sizes are used.
Matmul inputs: bf16/fp16 tensors feed ``tl.dot`` in their own dtype on the GPU (tensor cores, fp32
accumulation); fp32 tensors use exact fp32 products (``input_precision="ieee"``, no TF32); under the
interpreter everything is fp32 (its bf16 arithmetic is wrong).

``far_positions`` (``mover``, a :class:`ds_msattn.attention.options.KeyMover`): the kernels *rotate the selected
keys on load* (``kernels/rotary.py``) rather than attend to a gathered rotated copy. The shift of each key is a
few integer operations on what the kernels already hold (block id, slot rank, the block's selected count, W, G),
and the rotation a few FMAs per loaded key element with cos/sin from a ``[c + R, 2, D/2]`` table, so the moved
keys cost no extra memory traffic beyond that small, cached table. A gathered copy would have to be materialised
per (query head, block), ``[B, Hq, NB, (K-m)*c, D]``: ``Hq/Hkv * (K-m)/m`` times the size of k (12x at
Hq32/Hkv8, K64, m16), written and read back once in each of the three kernels, and its gradient scattered back
afterwards. The dk/dv kernel
rotates its region's tile once per selecting block and rotates that block's share of dk back.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .backward import ms_attention_delta_kernel, ms_attention_dkdv_kernel, ms_attention_dq_kernel, reverse_index
from .forward import ms_attention_fwd_kernel
from .rotary import MOVE_CODES, rotation_table, split_block

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _dot_args(dtype: torch.dtype) -> dict:
    if interpreting() or dtype == torch.float32:
        return dict(DOT_DTYPE=tl.float32, PREC="ieee")
    return dict(DOT_DTYPE=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, PREC="tf32")


#: GPU autotuning candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the forward and dq kernels.
QUERY_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2)]
#: ``(BLOCK_M, num_warps, num_stages)`` of the dk/dv kernel (its BLOCK_N is the region size, padded).
DKDV_CONFIGS = [(64, 4, 2), (128, 8, 2), (64, 4, 3)]


def _prune(configs, named_args, **kwargs):
    # BLOCK_M larger than a query block (m*c rows) would only add masked rows.
    # Triton passes the positional arguments as named_args and the keyword ones as kwargs.
    cap = _pow2(kwargs["MC"] if "MC" in kwargs else named_args["MC"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or [triton.Config({**configs[0].kwargs, "BLOCK_M": 16}, num_warps=4, num_stages=2)]


if not interpreting() and torch.cuda.is_available():
    # Autotune only with a driver: the interpreter cannot benchmark configurations.
    _query = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in QUERY_CONFIGS
    ]
    _tune = dict(key=["MC", "C", "D", "DV", "S", "MOVE"], prune_configs_by={"early_config_prune": _prune})
    _fwd = triton.autotune(_query, **_tune)(ms_attention_fwd_kernel)
    _dq = triton.autotune(_query, **_tune)(ms_attention_dq_kernel)
    _dkdv = triton.autotune(
        [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in DKDV_CONFIGS],
        key=["MC", "C", "D", "DV", "MOVE"],
        prune_configs_by={"early_config_prune": _prune},
    )(ms_attention_dkdv_kernel)
    TUNED = True
else:
    _fwd, _dq, _dkdv = ms_attention_fwd_kernel, ms_attention_dq_kernel, ms_attention_dkdv_kernel
    TUNED = False


def _plain_sizes(mc: int) -> dict:
    """Interpreter tile sizes: no larger than a block (masked rows cost Python time), at least 16."""
    return {"BLOCK_M": min(64, _pow2(mc)), "BLOCK_N": 32}


def _validate(q, k, v, sel, region_size, merge, scale, mover=None) -> None:
    for name, value in (("region_size", region_size), ("merge", merge)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, T, D], got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} dtype must be one of float32, bfloat16, float16, got {x.dtype}")
    B, Hq, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if k.shape != (B, Hkv, T, D) or v.shape[:3] != (B, Hkv, T):
        raise ValueError(f"k must be [B, Hkv, T, D] and v [B, Hkv, T, Dv] for q {tuple(q.shape)}, got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, size in (("head dim D", D), ("value head dim Dv", Dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be between 1 and {MAX_HEAD_DIM} for the Triton kernels, got {size} "
                             "(tiles are padded to a power of two >= 16)")
    NB = math.ceil(math.ceil(T / region_size) / merge)
    if sel.dim() != 4 or sel.dtype != torch.int64 or tuple(sel.shape[:3]) != (B, Hq, NB):
        raise ValueError(f"sel must be int64 [B, Hq, NB, K-m] = [{B}, {Hq}, {NB}, *] from select_regions, got "
                         f"{sel.dtype} {tuple(sel.shape)}")
    devices = {x.device for x in (q, k, v, sel)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, sel must be on one device, got {sorted(str(d) for d in devices)}")
    if mover is not None:
        if getattr(mover, "positions_sel", None) is not None or getattr(mover, "block_offset", 0) != 0:
            raise ValueError("the Triton kernels move keys of a whole input only (mover.positions_sel must be None "
                             "and mover.block_offset 0)")
        if (mover.region_size, mover.merge) != (region_size, merge):
            raise ValueError(f"mover was made for region_size={mover.region_size}, merge={mover.merge}, "
                             f"the call has {region_size}, {merge}")
        if D % 2 or tuple(mover.inv_freq.shape) != (D // 2,):
            raise ValueError(f"far_positions needs an even head dim and inv_freq [D/2] = [{D // 2}], got D={D}, "
                             f"inv_freq {tuple(mover.inv_freq.shape)}")
    if not q.is_cuda and not interpreting():
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                         f"triton), got device {q.device}")


class _Geometry:
    def __init__(self, q, k, v, sel, region_size, merge, mover=None):
        self.B, self.Hq, self.T, self.D = q.shape
        self.Hkv, self.Dv = k.shape[1], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.c, self.m, self.mc = region_size, merge, region_size * merge
        self.NB, self.S = sel.shape[2], sel.shape[3]
        self.R = math.ceil(self.T / region_size)
        self.BLOCK_DV = _pow2(self.Dv)
        if mover is None:
            self.move, self.W, self.group = 0, 0, 1
            self.rot = torch.empty(0, dtype=torch.float32, device=q.device)  # never read with MOVE=0
            self.BLOCK_D = _pow2(self.D)
        else:  # far_positions: keys rotate on load (split head layout, cos/sin table)
            opts = mover.options
            self.move, self.W, self.group = MOVE_CODES[opts.far_positions], opts.far_window, opts.far_group
            self.rot = rotation_table(mover.inv_freq.to(q.device), self.R, self.c)  # [c + R, 2, D/2]
            self.BLOCK_D = split_block(self.D)  # the split head layout of kernels/rotary.py

    def query_args(self) -> dict:
        return dict(T=self.T, NB=self.NB, S=self.S, HQ=self.Hq, G=self.G, C=self.c, MERGE=self.m, MC=self.mc,
                    D=self.D, DV=self.Dv, W=self.W, GROUP=self.group, MOVE=self.move)


def _launch_query_kernel(kernel, geo: _Geometry, tensors: tuple, scalars: dict, dtype: torch.dtype) -> None:
    """Launch the forward or dq kernel: one program per (query tile, batch * query head)."""
    sizes = {} if TUNED else _plain_sizes(geo.mc)
    grid = lambda meta: (geo.NB * triton.cdiv(geo.mc, meta["BLOCK_M"]), geo.B * geo.Hq)  # noqa: E731
    kernel[grid](*tensors, **geo.query_args(), **scalars, **sizes, BLOCK_D=geo.BLOCK_D, BLOCK_DV=geo.BLOCK_DV,
                 **_dot_args(dtype))


def _forward(q, k, v, sel, geo: _Geometry, scale: float):
    o = torch.empty(geo.B, geo.Hq, geo.T, geo.Dv, dtype=q.dtype, device=q.device)
    lse2 = torch.empty(geo.B, geo.Hq, geo.T, dtype=torch.float32, device=q.device)
    _launch_query_kernel(_fwd, geo, (q, k, v, sel, o, lse2, geo.rot), dict(scale_log2e=scale * LOG2E), q.dtype)
    return o, lse2


def _backward(do, q, k, v, sel, o, lse2, geo: _Geometry, scale: float):
    delta = torch.empty(geo.B, geo.Hq, geo.T, dtype=torch.float32, device=q.device)  # rowsum(do * o)
    rows = geo.B * geo.Hq * geo.T
    ms_attention_delta_kernel[(triton.cdiv(rows, 64),)](o, do, delta, rows, geo.Dv, BLOCK_R=64, BLOCK_DV=geo.BLOCK_DV)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _launch_query_kernel(_dq, geo, (q, k, v, sel, do, lse2, delta, dq, geo.rot),
                         dict(scale=scale, scale_log2e=scale * LOG2E), q.dtype)
    if geo.move:
        offsets, entries, slots = reverse_index(sel, geo.Hkv, geo.R, with_slots=True)
    else:
        (offsets, entries), slots = reverse_index(sel, geo.Hkv, geo.R), geo.rot  # slots never read with MOVE=0
    args = dict(T=geo.T, NB=geo.NB, R=geo.R, HQ=geo.Hq, G=geo.G, C=geo.c, MERGE=geo.m, MC=geo.mc, D=geo.D,
                DV=geo.Dv, S=geo.S, W=geo.W, GROUP=geo.group, MOVE=geo.move, scale=scale, scale_log2e=scale * LOG2E,
                BLOCK_N=_pow2(geo.c), BLOCK_D=geo.BLOCK_D, BLOCK_DV=geo.BLOCK_DV, **_dot_args(q.dtype))
    if not TUNED:
        args["BLOCK_M"] = _plain_sizes(geo.mc)["BLOCK_M"]
    _dkdv[(geo.R, geo.B * geo.Hkv)](q, k, v, do, lse2, delta, offsets, entries, dk, dv, slots, geo.rot, **args)
    return dq, dk, dv


class MSAttentionTritonFunction(torch.autograd.Function):
    """Attention over pre-selected regions with Triton kernels; ``sel`` comes from ``select_regions``."""

    @staticmethod
    def forward(ctx, q, k, v, sel, region_size: int, merge: int, scale: float, mover=None):
        q, k, v, sel = (x.contiguous() for x in (q, k, v, sel))
        geo = _Geometry(q, k, v, sel, region_size, merge, mover)
        o, lse2 = _forward(q, k, v, sel, geo, scale)
        ctx.save_for_backward(q, k, v, sel, o, lse2)
        ctx.params = (region_size, merge, scale, mover)
        return o

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sel, o, lse2 = ctx.saved_tensors
        region_size, merge, scale, mover = ctx.params
        geo = _Geometry(q, k, v, sel, region_size, merge, mover)
        dq, dk, dv = _backward(grad_out.to(q.dtype).contiguous(), q, k, v, sel, o, lse2, geo, scale)
        return dq, dk, dv, None, None, None, None, None


def ms_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, *, region_size: int, merge: int,
    scale: float | None = None, mover=None,
) -> torch.Tensor:
    """MS attention with Triton kernels, given the selection.

    Args:
        q: ``[B, Hq, T, D]``; k: ``[B, Hkv, T, D]``; v: ``[B, Hkv, T, Dv]`` (fp32, bf16 or fp16, one dtype).
        sel: ``[B, Hq, NB, K - m]`` int64 from :func:`ds_msattn.attention.select_regions` (ascending, -1 padded).
        region_size: c; merge: m; scale: softmax scale (default ``D ** -0.5``).
        mover: ``far_positions`` other than ``exact``: the :class:`ds_msattn.attention.options.KeyMover` of the call
            (its options, ``inv_freq [D/2]``); the kernels rotate the selected keys on load.

    Returns:
        ``o [B, Hq, T, Dv]`` in q's dtype; differentiable in q, k, v.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if mover is not None and not mover.options.moves_keys:
        mover = None  # far_positions="exact": the plain kernels
    _validate(q, k, v, sel, region_size, merge, scale, mover)
    return MSAttentionTritonFunction.apply(q, k, v, sel, region_size, merge, float(scale), mover)
