"""ZeRO-3 helpers for the trainer: partitioned loading, rank-0 gathering, and universal checkpoints.

- :func:`partitioned_loading` is the context in which the model is built under ZeRO-3: transformers'
  DeepSpeed integration (``HfDeepSpeedConfig``) builds it inside ``deepspeed.zero.Init``, so each module's
  parameters are partitioned as soon as the module exists (``from_pretrained`` loads each tensor on rank 0
  and scatters it); no rank ever holds the whole model.
- :func:`partitioned_empty_build` builds a model that is filled afterwards (random init) inside
  ``deepspeed.zero.Init`` without transformers' gathered re-initialization.
- :func:`partitioned_peft_copies` lets peft copy its ``modules_to_save`` without gathering them and partitions the
  copies at once.
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


def _replace_parameters(model: torch.nn.Module, new: dict[int, torch.nn.Parameter]) -> None:
    """Put ``new[id(p)]`` wherever ``model`` holds parameter ``p`` (tied parameters stay tied)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                setattr(module, name, new[id(param)])


@contextlib.contextmanager
def partitioned_peft_copies(model: torch.nn.Module, module_names, enabled: bool = True):
    """Let peft copy the ``modules_to_save`` of a ZeRO-3 partitioned ``model`` without gathering them.

    peft gathers a partitioned module to deep-copy it (``ModulesToSaveWrapper.update``): each rank would hold the
    full module twice (the gathered parameters and the copy), and the copy full until ``deepspeed.initialize``.
    Inside the context the partitioned parameters of the modules peft will copy (its rule: the module name ends
    with one of ``module_names``) are meta tensors of their full shape, so peft skips the gather and its copies
    hold no memory; on exit the originals are put back and :func:`release_copied_partitions` partitions the copies.
    """
    stand_ins: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    if enabled and module_names:
        for name, module in model.named_modules(remove_duplicate=False):
            if not any(name.endswith(key) for key in module_names):
                continue
            for param in module.parameters():
                # a partition swapped out to NVMe cannot be copied in memory: leave that module to peft's gather
                if is_partitioned(param) and getattr(param.ds_tensor, "final_location", None) is None:
                    meta = torch.empty(param.ds_shape, dtype=param.dtype, device="meta")
                    stand_ins.setdefault(id(param), (param, torch.nn.Parameter(meta, param.requires_grad)))
    _replace_parameters(model, {key: meta for key, (_, meta) in stand_ins.items()})
    try:
        yield
    finally:
        for param, meta in stand_ins.values():
            param.requires_grad_(meta.requires_grad)  # peft froze the original through its stand-in
        _replace_parameters(model, {id(meta): param for param, meta in stand_ins.values()})
    if enabled:
        release_copied_partitions(model, copied_from={id(param) for param, _ in stand_ins.values()})


def release_copied_partitions(model: torch.nn.Module, copied_from: set[int] | None = None) -> int:
    """Partition peft's ``modules_to_save`` copies of ZeRO-3 partitioned modules, never holding them full again.

    A copy made from a meta stand-in (:func:`partitioned_peft_copies`) gets empty full-size storage that
    DeepSpeed partitions at once (``convert_to_zero_parameters`` of the original's ZeRO-3 context, as the engine
    does for new parameters: same group and offload device); its partition is then copied from the original's,
    which has the same layout. A copy that peft made while gathered keeps its full storage (no clone) and is
    partitioned the same way. ``copied_from``: the ids of the originals that had stand-ins (a copy tied into
    another wrapper, as peft ties the output projection to the embedding copy, takes its partition from the
    module it was copied from). Returns how many parameters were partitioned.
    """
    from peft.utils.other import ModulesToSaveWrapper

    done: dict[int, torch.nn.Parameter] = {}
    for wrapper in [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]:
        originals = dict(wrapper.original_module.named_parameters())
        for copy in wrapper.modules_to_save.values():
            for name, param in copy.named_parameters():
                original = originals.get(name)
                if id(param) in done or original is None or not is_partitioned(original):
                    continue
                from_meta = param.is_meta
                if from_meta and copied_from is not None and id(original) not in copied_from:
                    continue
                if from_meta:
                    data = torch.empty(original.ds_shape, dtype=original.dtype)
                elif not is_partitioned(param) or param.data.numel() == param.ds_numel > 0:
                    data = param.data  # a copy made while gathered (it may carry the original's ds_* attributes)
                    param.data = torch.empty(0, dtype=data.dtype, device=data.device)
                else:
                    continue
                fresh = torch.nn.Parameter(data, requires_grad=param.requires_grad)
                del data  # the full storage is fresh's alone, freed as DeepSpeed partitions it
                original.convert_to_zero_parameters(param_list=[fresh])
                if from_meta:
                    if fresh.ds_tensor.shape != original.ds_tensor.shape:
                        raise RuntimeError(f"{name}: partition {tuple(fresh.ds_tensor.shape)} differs from the "
                                           f"original's {tuple(original.ds_tensor.shape)}")
                    with torch.no_grad():
                        fresh.ds_tensor.copy_(original.ds_tensor)
                done[id(param)] = fresh
    _replace_parameters(model, done)
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise RuntimeError(f"no partitioned original to copy for {left[:4]}")
    return len(done)


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
