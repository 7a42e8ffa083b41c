"""SF-Attn, SinkLoRA's sink fixed attention (arXiv 2406.05678), fast torch path.

Tensors as in :mod:`ds_msattn.attention.s2`: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` -> ``[B, Hq, T, Dv]``.

SinkLoRA describes SF-Attn as S2-Attn plus (1) a *segmentation and reassembly* step that "proportionally returns
cyclically shifted groups of attention heads to their un-shifted state", against S2-Attn's "unnecessary
information exchange between token groups", and (2) *global attention to sink attention tokens*. Its public
repository (Dexter-GT-86/SinkLoRA) holds only LongLoRA's attention files (``llama_attn_replace.py`` with the
cyclic ``roll`` of ``forward_noflashattn``), no SF-Attn code, so this project reads the paper as follows
(docs/other_methods.md says why):

- **Segmentation and reassembly.** S2-Attn's cyclic roll makes one group of the shifted heads out of the
  sequence's last ``shift`` tokens followed by its first ``shift`` tokens. SF-Attn cuts that wrapped group at the
  wrap point and puts each segment back where it came from: the shifted heads' groups are ``[0, shift)``,
  ``[shift, shift + G)``, ... in token order (no token attends across the sequence's ends). The unshifted heads
  keep ``[0, G)``, ``[G, 2G)``, ...
- **Sink tokens.** Every query, in every head, also attends to the first ``sink_tokens`` tokens of the sequence
  (StreamingLLM's four initial tokens by default), causally: a sink is seen by the queries at or after it.
  A sink inside the query's own group is counted once.
"""

from __future__ import annotations

import torch

from .s2 import DEFAULT_GROUP_RATIO, shifted_sparse_attention

#: StreamingLLM's (arXiv 2309.17453) four initial tokens, which SinkLoRA's sink attention tokens follow.
DEFAULT_SINK_TOKENS = 4


def sf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size: int | None = None,
                 group_ratio: float = DEFAULT_GROUP_RATIO, shift: int | None = None,
                 sink_tokens: int = DEFAULT_SINK_TOKENS, scale: float | None = None) -> torch.Tensor:
    """SF-Attn: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` -> ``[B, Hq, T, Dv]`` (module docstring). Differentiable."""
    return shifted_sparse_attention(q, k, v, group_size=group_size, group_ratio=group_ratio, shift=shift, wrap=False,
                                    sink_tokens=sink_tokens, scale=scale)
