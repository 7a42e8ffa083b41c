"""ZeRO-3 helpers for the trainer: partitioned loading, rank-0 gathering, and universal checkpoints.

- :func:`partitioned_loading` is the context in which the model is built under ZeRO-3: transformers'
  DeepSpeed integration (``HfDeepSpeedConfig``) builds it inside ``deepspeed.zero.Init``, so each module's
  parameters are partitioned as soon as the module exists (``from_pretrained`` loads each tensor on rank 0
  and scatters it); no rank ever holds the whole model.
- :func:`partitioned_empty_build` builds a model that is filled afterwards (random init) inside
  ``deepspeed.zero.Init`` without transformers' gathered re-initialization.
- :func:`gathered_state_dict` gathers one module at a time and keeps the full tensors on rank 0 only.
- :func:`loading_allocator` keeps glibc from holding freed host memory while the model is built and partitioned.
- :func:`to_universal` converts a ZeRO checkpoint written by N ranks into DeepSpeed's universal format
  (``deepspeed.checkpoint.ds_to_universal``), which an engine of any world size loads with
  ``{"checkpoint": {"load_universal": true}}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def loading_allocator(loading: bool, train_threshold_mib: int = 32) -> None:
    """Host allocator settings for loading (True) and for training afterwards (False).

    Partitioning allocates each full parameter, copies its 1/world share and frees it. glibc's dynamic mmap
    threshold (raised to 32 MiB by the first large free) sends the later 2-32 MiB tensors to the heap, whose
    holes stay resident: measured on 2 ranks with a 0.37B model, a rank's peak was 3.2-3.5 GiB instead of 2.3.
    While loading, blocks of 1 MiB and more are mapped (freed straight back to the system); afterwards the
    threshold is ``train_threshold_mib`` (``train.host_mmap_threshold_mib``; 32 is where glibc's dynamic rule
    ends: fewer page faults than mapping every mid-size tensor), the trim threshold twice it, and freed memory
    is trimmed.
    """
    if loading:
        _mallopt(M_MMAP_THRESHOLD, 1 << 20)
        return
    if _mallopt(M_MMAP_THRESHOLD, train_threshold_mib << 20):
        _mallopt(M_TRIM_THRESHOLD, 2 * train_threshold_mib << 20)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def zero_stage(ds_config: dict | None) -> int:
    return int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


@contextlib.contextmanager
def partitioned_loading(ds_config: dict | None, enabled: bool = True):
    """Build models inside ``deepspeed.zero.Init`` (through transformers) when ``ds_config`` is ZeRO-3.

    Outside the context transformers sees no DeepSpeed config again, so a later plain build (the merged export
    on rank 0) loads normally.
    """
    if not enabled or zero_stage(ds_config) != 3:
        yield False
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: keep it alive here
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del keep


@contextlib.contextmanager
def partitioned_empty_build(ds_config: dict | None, enabled: bool = True):
    """Build a model to be filled afterwards (random init) partitioned from the start, when ZeRO-3.

    Inside ``deepspeed.zero.Init`` each module is partitioned as soon as it exists, and transformers'
    ``no_init_weights`` skips its own random init. Through ``HfDeepSpeedConfig`` instead, transformers would
    re-initialize every module after the build by gathering it (``initialize_weights_zero3``): the largest module
    full on every rank, twice (the gathered tensor and the all-gather buffer), only to be overwritten by
    :func:`ds_msattn.models.init_weights_seeded`. Yields whether the build is partitioned.
    """
    if not enabled or zero_stage(ds_config) != 3:
        yield False
        return
    import deepspeed
    from transformers.initialization import no_init_weights

    try:  # keeps RoPE's arange buffers in their own dtype under zero.Init (what transformers' own zero-3 build does)
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:  # pragma: no cover - older or newer transformers without it
        prevent_arange_dtype_change = contextlib.nullcontext
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield True


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def release_copied_partitions(model: torch.nn.Module) -> int:
    """Turn ZeRO-3 parameters that were deep-copied while gathered (peft's ``modules_to_save`` copies) into plain ones.

    A deep copy of a gathered parameter keeps DeepSpeed's bookkeeping (its ``ds_id`` and partition) next to full
    data; replaced by a fresh parameter, the engine partitions it like any new one. Returns how many were replaced.
    """
    replaced = 0
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            # a partitioned parameter holds an empty tensor outside GatheredParameters; a copy kept the full one
            if is_partitioned(param) and param.data.numel() == param.ds_numel > 0:
                setattr(module, name, torch.nn.Parameter(param.data.clone(), requires_grad=param.requires_grad))
                replaced += 1
    return replaced


def gathered_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` with full tensors on rank 0 (None elsewhere), gathering one submodule at a time."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        own = dict(sub.named_parameters(recurse=False))
        params = [p for p in own.values() if is_partitioned(p)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if rank == 0:
                for name, tensor in list(own.items()) + list(sub.named_buffers(recurse=False)):
                    if name in sub._non_persistent_buffers_set:
                        continue
                    state[f"{prefix}.{name}" if prefix else name] = tensor.detach().clone().cpu()
    return state if rank == 0 else None


def to_universal(tag_dir: Path, out_dir: Path) -> Path:
    """``ds_to_universal`` of one ZeRO checkpoint (``tag_dir`` = ``<ckpt>/ds``) into ``out_dir``, atomically."""
    from deepspeed.checkpoint import ds_to_universal

    if (out_dir / "zero").is_dir():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)
    os.replace(tmp, out_dir)
    return out_dir
