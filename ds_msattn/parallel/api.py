"""The seam between training (``ds_msattn/train.py``) and sequence parallelism.

``setup_sequence_parallel(cfg, model)`` creates DeepSpeed's DP x SP groups and routes the registered
"ms_attention" function (``ds_msattn.hf.set_attention_override``) through region sharding or Ulysses.
Per micro-batch the training loop calls ``shard_batch`` (global sequence -> this rank's shard),
the model, ``reduce_loss`` (-> the tensor to backward) and ``logged_loss`` / ``global_mean_loss``.

Loss and gradients: the objective is the token mean over every non-ignored token of the global batch
(all DP x SP ranks). Each rank backwards ``loss_sum_local * W / N_global`` where W is the number that
DeepSpeed divides the summed gradients by, so that the reduced gradient is exactly the gradient of the
global token mean. W depends on the ZeRO path (DeepSpeed 0.19.8, read in its code and measured with an
SGD step against a single process, tests/test_sp_train.py):

- ZeRO 0, 1, 2 and ZeRO-3 with ``reduce_scatter: false`` divide by ``world / P`` (the DP size);
- ZeRO-3 with ``reduce_scatter`` (its default) uses ``reduce_scatter_coalesced``, which divides by the
  whole sequence-data-parallel world (DP x SP), ignoring P.

Using one factor for every stage gives gradients P times off on one of the two paths (FACTS.md saw
this with DeepSpeed's Ulysses HF path); ``update_ds_config`` reads the stage, so the factor follows it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .groups import SequenceParallelGroups, init_sequence_parallel_groups
from .region_shard import TrafficStats, region_sharded_attention
from .ulysses import UlyssesMSAttention, check_heads

IGNORE_INDEX = -100
MODES = ("region", "ulysses")


def _hf_config(model):
    inner = model
    for attr in ("causal_lm",):
        if hasattr(inner, attr):
            inner = getattr(inner, attr)()
    while not hasattr(inner, "config") and hasattr(inner, "model"):
        inner = inner.model
    return inner.config


class SequenceParallel:
    """One rank's sequence-parallel state; see the module docstring for the call order."""

    def __init__(self, groups: SequenceParallelGroups, mode: str, ms_params: dict):
        if mode not in MODES:
            raise ValueError(f"parallel.sp_mode must be one of {MODES}, got {mode!r}")
        self.groups = groups
        self.mode = mode
        self.sp_size, self.sp_rank = groups.sp_size, groups.sp_rank
        self.dp_size, self.dp_rank = groups.dp_size, groups.dp_rank
        self.block = ms_params["region_size"] * ms_params["merge"]  # shards are whole query blocks
        self.valid_len: int | None = None
        self.grad_divisor: int | None = None  # set by update_ds_config (see the module docstring)
        self.stats = TrafficStats()
        self.ulysses = UlyssesMSAttention(groups.sp_group) if mode == "ulysses" else None
        self._logged = False

    # -------------------------------------------------------------- DeepSpeed
    def update_ds_config(self, ds_config: dict) -> None:
        """Tell DeepSpeed the SP size (its batch arithmetic counts DP ranks only)."""
        ds_config["sequence_parallel_size"] = self.sp_size
        ds_config.pop("train_batch_size", None)  # micro batch x accumulation x DP size
        zero = ds_config.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        if stage == 3 and zero.get("reduce_scatter", True):
            self.grad_divisor = self.dp_size * self.sp_size  # reduce_scatter_coalesced averages over every rank
        else:
            self.grad_divisor = self.dp_size  # divides by world / sequence_parallel_size

    def initialize_kwargs(self) -> dict:
        """Extra ``deepspeed.initialize`` kwargs: the mpu that holds the SP and SP x DP groups."""
        return {"mpu": self.groups.mpu}

    # -------------------------------------------------------------- data
    def shard_length(self, T: int) -> int:
        """Tokens per rank for a global length T: whole query blocks, the end padded."""
        return math.ceil(T / (self.sp_size * self.block)) * self.block

    def shard_batch(self, batch: dict) -> dict:
        """``input_ids``, ``labels`` (already shifted), ``position_ids`` ``[B, T]`` -> this rank's ``[B, Tl]``.

        The end is padded to ``P * Tl`` (input 0, labels -100, positions continuing); every rank gets the
        same Tl. Positions are the global (CRD-NTK transformed) ones, cut like the tokens.
        """
        T = batch["input_ids"].shape[-1]
        Tl = self.shard_length(T)
        pad = self.sp_size * Tl - T
        lo, hi = self.sp_rank * Tl, (self.sp_rank + 1) * Tl
        out = {}
        for key, x in batch.items():
            if pad:
                if key == "labels":
                    fill = torch.full((*x.shape[:-1], pad), IGNORE_INDEX, dtype=x.dtype, device=x.device)
                elif key == "position_ids":
                    fill = x[..., -1:] + torch.arange(1, pad + 1, dtype=x.dtype, device=x.device)
                else:
                    fill = torch.zeros((*x.shape[:-1], pad), dtype=x.dtype, device=x.device)
                x = torch.cat([x, fill], dim=-1)
            out[key] = x[..., lo:hi].contiguous()
        self.valid_len = T
        self.stats.clear()
        if self.ulysses is not None:
            self.ulysses.bytes_sent.clear()
        return out

    # -------------------------------------------------------------- attention
    def attention(self, module, q, k, v, params: dict, **kwargs) -> torch.Tensor:
        """The override of the registered "ms_attention": ``q [B, Hq, Tl, D]`` -> ``o [B, Hq, Tl, Dv]``."""
        if self.valid_len is None:
            raise ValueError("sequence parallel attention called before shard_batch (valid length unknown)")
        if q.shape[2] != k.shape[2]:
            raise ValueError("sequence-parallel ms_attention does not support a KV cache (decoding)")
        params = {key: value for key, value in params.items() if key != "backend"}  # sizes, scale and options
        if self.mode == "region":
            return region_sharded_attention(
                q, k, v, **params, valid_len=self.valid_len, group=self.groups.sp_group, stats=self.stats)
        return self.ulysses(q, k, v, params, self.valid_len)

    def traffic(self) -> dict:
        """Bytes this rank sent and received since the last ``shard_batch`` (all layers, forward + recomputes)."""
        if self.mode == "region":
            return self.stats.totals() | {"layers": len(self.stats.records)}
        sent = sum(self.ulysses.bytes_sent)
        return {"a2a_sent_forward": sent, "a2a_recv_forward": sent, "layers": len(self.ulysses.bytes_sent)}

    # -------------------------------------------------------------- loss
    def _global_counts(self, loss_sum: torch.Tensor, n_tokens) -> tuple[float, float]:
        t = torch.stack([loss_sum.detach().double().cpu().reshape(()),
                         torch.as_tensor(n_tokens).double().cpu().reshape(())])
        dist.all_reduce(t)  # every rank: DP x SP
        return float(t[0]), float(t[1])

    def reduce_loss(self, loss_sum: torch.Tensor, n_tokens) -> torch.Tensor:
        """``loss_sum * W / N_global``: DeepSpeed's gradient sum over ranks / W is then d(global token mean)."""
        if self.grad_divisor is None:
            raise ValueError("call update_ds_config(ds_config) before training: the loss factor depends on the ZeRO stage")
        _, total = self._global_counts(loss_sum, n_tokens)
        if not self._logged and dist.get_rank() == 0:
            # once per run: what one micro-batch moved (all layers, forward incl. checkpoint recomputes)
            print(f"sequence parallel ({self.mode}, P={self.sp_size}): bytes of rank 0 for one micro-batch: "
                  f"{self.traffic()}", flush=True)
            self._logged = True
        return loss_sum * (self.grad_divisor / max(total, 1.0))

    def global_mean_loss(self, loss_sum: torch.Tensor, n_tokens) -> float:
        """Token-weighted mean loss over the whole global batch (for logging)."""
        total_loss, total = self._global_counts(loss_sum, n_tokens)
        return total_loss / max(total, 1.0)

    logged_loss = global_mean_loss

    def close(self) -> None:
        from ds_msattn import hf

        hf.set_attention_override(None)


def setup_sequence_parallel(cfg, model) -> SequenceParallel:
    """Groups through DeepSpeed, checks, and the attention override; ``cfg.parallel`` holds the SP settings."""
    from ds_msattn import hf

    sp_size = cfg.parallel.sequence_parallel_size
    mode = cfg.parallel.sp_mode
    if mode not in MODES:
        raise ValueError(f"parallel.sp_mode must be one of {MODES}, got {mode!r}")
    config = _hf_config(model)
    impl = getattr(config, "_attn_implementation", None)
    if impl != hf.NAME:
        raise ValueError(f"sequence parallelism needs attention.implementation='ms_attention', got {impl!r}")
    params = hf.ms_attention_params(config)
    if mode == "ulysses":
        check_heads(config.num_attention_heads, getattr(config, "num_key_value_heads", None)
                    or config.num_attention_heads, sp_size)
    groups = init_sequence_parallel_groups(sp_size)
    sp = SequenceParallel(groups, mode, params)
    hf.set_attention_override(sp.attention)
    return sp
