"""DeepSpeed-Ulysses with MS attention as the local attention.

``deepspeed.sequence.layer.DistributedAttention`` turns the sequence shards ``[B, T/P, H, D]`` into head
shards ``[B, T, H/P, D]`` (all-to-all of q, k, v), runs the local attention on the whole sequence for
its heads, and turns the output back (all-to-all of o); its autograd does the reverse in backward.
The head counts must divide by P (query and kv heads: GQA groups must not be torn apart).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_msattn.attention import ms_attention


def check_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> None:
    """ValueError unless ``sp_size`` divides both head counts."""
    if num_heads % sp_size or num_kv_heads % sp_size:
        raise ValueError(
            f"sp_mode='ulysses' needs parallel.sequence_parallel_size ({sp_size}) to divide the number of attention "
            f"heads ({num_heads}) and of key/value heads ({num_kv_heads}); use sp_mode='region' or another size")


class _LocalMSAttention(torch.nn.Module):
    """MS attention of the whole gathered sequence for this rank's heads; layout ``[B, T, h, D]``.

    Tokens past ``valid_len`` (shard padding) are cut before attention, so that summaries and selection
    are those of the unpadded sequence; their output rows are zero.
    """

    def __init__(self):
        super().__init__()
        self.params: dict = {}
        self.valid_len = 0

    def forward(self, q, k, v):
        T = q.shape[1]
        n = self.valid_len
        qh, kh, vh = (x[:, :n].transpose(1, 2) for x in (q, k, v))  # [B, h, n, D]
        o = ms_attention(qh, kh, vh, **self.params).transpose(1, 2)  # [B, n, h, Dv]
        if n < T:
            o = torch.cat([o, o.new_zeros(o.shape[0], T - n, *o.shape[2:])], dim=1)
        return o


class UlyssesMSAttention:
    """``__call__(q [B, Hq, Tl, D], k, v [B, Hkv, Tl, *], params, valid_len) -> o [B, Hq, Tl, Dv]``.

    ``bytes_per_call(...)`` gives what one rank sends (= receives) per forward: (P-1)/P of its q, k, v
    and o; backward moves the same amount again.
    """

    def __init__(self, group):
        import deepspeed
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        if not deepspeed.comm.is_initialized():  # DistributedAttention talks through deepspeed.comm
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

        self.group = group
        self.local = _LocalMSAttention()
        # [B, T, H, D]: scatter heads (dim 2), gather the sequence (dim 1)
        self.attention = DistributedAttention(self.local, group, scatter_idx=2, gather_idx=1)
        self.bytes_sent: list[int] = []

    def __call__(self, q, k, v, params: dict, valid_len: int):
        P = dist.get_world_size(self.group)
        check_heads(q.shape[1], k.shape[1], P)
        params = dict(params)
        if params.get("position_ids") is not None:  # the local attention sees the whole sequence: all positions
            pos = params["position_ids"].view(-1, q.shape[2]).expand(q.shape[0], -1).contiguous()
            gathered = torch.empty(P * pos.shape[0], pos.shape[1], dtype=pos.dtype, device=pos.device)
            dist.all_gather_single(gathered, pos, group=self.group)
            full = gathered.view(P, pos.shape[0], -1).permute(1, 0, 2).reshape(pos.shape[0], -1)
            params["position_ids"] = full[:, :valid_len]
        self.local.params = params
        self.local.valid_len = valid_len
        o = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)  # [B, Tl, Hq, Dv]
        self.bytes_sent.append(self.bytes_per_call(q, k, v, P))
        return o.transpose(1, 2)

    @staticmethod
    def bytes_per_call(q, k, v, P: int) -> int:
        o_numel = q.numel() // q.shape[-1] * v.shape[-1]
        n = q.numel() + k.numel() + v.numel() + o_numel
        return n * q.element_size() * (P - 1) // P
