"""Triton kernels for MS attention (installed as ``ds_msattn.kernels``).

``ms_attention_triton(q, k, v, sel, *, region_size, merge, scale, mover=None)`` has the contract of
``ds_msattn.attention.torch_path.ms_attention_torch``: ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``,
``v [B, Hkv, T, Dv]``, ``sel [B, Hq, NB, K-m]`` from ``select_regions`` -> ``o [B, Hq, T, Dv]``; ``mover`` (a
``KeyMover``) moves the selected keys for ``far_positions``. ``select_regions_triton`` has the contract of
``select_regions`` (the selection kernel, ``kernels/select.py``).
"""

from .function import MSAttentionTritonFunction, ms_attention_triton
from .select import select_regions_triton

__all__ = ["MSAttentionTritonFunction", "ms_attention_triton", "select_regions_triton"]
