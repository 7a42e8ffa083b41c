"""Run configuration: typed dataclasses, one per component, read from YAML/JSON plus dotted CLI overrides.

    cfg = load_config("ds_configs/recipes/tiny.yaml", ["--train.max_steps=3", "--resume=auto"])

Every field is type-checked when the file and the overrides are applied, and each section validates its
values in `__post_init__`; errors are `ValueError`s that name the dotted key and what is allowed. The
resolved config is written to `<output_dir>/config.yaml` by the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .attention.options import MODEL_OPTIONS, make_options
from .attention.s2 import DEFAULT_GROUP_RATIO, check_shifted_params

#: parameter dtypes of a model, in training and evaluation (names of torch dtypes; bfloat16: AMX or AVX512-BF16
#: CPUs and GPUs run its matmuls several times faster)
MODEL_DTYPES = ("float32", "bfloat16")

#: Attention implementations of the shifted family (ds_msattn.hf_shifted): training attentions, dense at eval.
SHIFTED_IMPLEMENTATIONS = ("s2_attention", "sf_attention")


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {sorted(allowed)}, got {value!r}")


def _check_positive(key: str, value, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


@dataclass
class ModelConfig:
    """Which model to fine-tune."""

    name: str = "tiny"
    """'tiny' (random-init Llama built from `tiny`), an alias known to ds_msattn.models (e.g. 'smollm2') or a HF dir."""
    tiny: dict = field(default_factory=dict)
    """LlamaConfig keyword arguments for name='tiny' (hidden_size, num_hidden_layers, vocab_size, ...)."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16 (match the DeepSpeed config's bf16 setting)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in backward (activation checkpointing): memory O(layers * T * hidden)."""
    init_seed: int = 0
    """Seed for the random initialisation of a tiny model and of the LoRA weights."""

    def __post_init__(self):
        _check_choice("model.dtype", self.dtype, set(MODEL_DTYPES))
        if not self.name:
            raise ValueError("model.name must be 'tiny', a model alias or a directory, got ''")


@dataclass
class ShiftedAttentionConfig:
    """S2-Attn / SF-Attn parameters (docs/other_methods.md); they go to `config.shifted_attention`."""

    group_size: int | None = None
    """G, tokens per group; null: int(seq_len * group_ratio), as LongLoRA."""
    group_ratio: float = DEFAULT_GROUP_RATIO
    """G as a fraction of the sequence when group_size is null (LongLoRA: 1/4)."""
    shift: int | None = None
    """Tokens the second half of the heads is shifted by; null: G // 2."""
    wrap: bool | None = None
    """Cyclic shift (LongLoRA's roll) or groups [0, shift), [shift, shift + G), ...; null: s2 true, sf false."""
    sink_tokens: int | None = None
    """Leading tokens every query also attends to; null: s2 0, sf 4."""
    eval_dense: bool = True
    """Dense causal attention when the model is in eval mode (LongLoRA's inference); false keeps the pattern."""

    def __post_init__(self):
        try:
            check_shifted_params(self.group_size, self.group_ratio, self.shift, self.sink_tokens or 0)
        except ValueError as e:
            raise ValueError(f"attention.shifted.{e}") from None

    def model_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AttentionConfig:
    """Attention implementation; MS parameters go to `config.ms_attention` for ds_msattn.hf."""

    implementation: str = "ms_attention"
    """ms_attention, s2_attention, sf_attention, sdpa or eager."""
    region_size: int = 16
    """c: tokens per region."""
    top_k: int = 8
    """K: regions attended per query block, its own block included."""
    merge: int = 2
    """m: query regions merged into one block (1 <= m <= K)."""
    sink_regions: int = 1
    """s: leading regions always attended."""
    far_positions: str = MODEL_OPTIONS["far_positions"]
    """exact, compact, capped or grouped: where selected far keys sit for RoPE (docs/design.md)."""
    far_window: int = MODEL_OPTIONS["far_window"]
    """W (tokens) of capped and grouped."""
    far_group: int = MODEL_OPTIONS["far_group"]
    """G of grouped: far distances divided by G."""
    score: str = MODEL_OPTIONS["score"]
    """rope or position_free: what region summaries are means of."""
    select_per: str = MODEL_OPTIONS["select_per"]
    """head or kv_group: one selection per query head or per kv head."""
    shifted: ShiftedAttentionConfig = field(default_factory=ShiftedAttentionConfig)
    """Parameters of s2_attention and sf_attention."""

    def __post_init__(self):
        if self.implementation == "esa_attention":
            raise ValueError("attention.implementation=esa_attention is an inference method (ESA selects tokens of a "
                             "trained model and is not trained with): use it with ds-msattn eval passkey|ppl --attn "
                             "esa_attention, and train with ms_attention, s2_attention, sf_attention, sdpa or eager")
        _check_choice("attention.implementation", self.implementation,
                      {"ms_attention", "sdpa", "eager", *SHIFTED_IMPLEMENTATIONS})
        _check_positive("attention.region_size", self.region_size)
        _check_positive("attention.top_k", self.top_k)
        if not 1 <= self.merge <= self.top_k:
            raise ValueError(f"attention.merge must satisfy 1 <= merge <= top_k={self.top_k}, got {self.merge}")
        _check_positive("attention.sink_regions", self.sink_regions, zero_ok=True)
        try:
            make_options(**{key: getattr(self, key) for key in MODEL_OPTIONS})
        except ValueError as e:
            raise ValueError(f"attention.{e}") from None

    def ms_attention_dict(self) -> dict:
        return {"region_size": self.region_size, "top_k": self.top_k, "merge": self.merge,
                "sink_regions": self.sink_regions, **{key: getattr(self, key) for key in MODEL_OPTIONS}}


@dataclass
class PositionsConfig:
    """CRD-NTK positions (DESIGN.md). Defaults are the paper's settings."""

    enabled: bool = True
    """Apply the CRD-NTK rope type and the training position transform."""
    cycle_length: int = 32768
    """Lc: training positions wrap modulo this length; also the L of the NTK base formula."""
    max_shift: int = 4 * 2**20
    """Shifts are drawn uniformly from [0, max_shift) once per optimizer step."""
    alpha0: float = 16.0
    """alpha at step 0."""
    growth: float = 2.0
    """alpha is multiplied by this every `interval` steps."""
    interval: int = 2000
    """Steps between alpha growths."""
    alpha_max: float = 64.0
    """Cap on alpha."""
    seed: int = 0
    """Seed of the shift generator, combined with the step."""
    inference_alpha: float | None = None
    """alpha used by exported/inference models (no wrap, no shift); None: the alpha of the last training step."""

    def __post_init__(self):
        _check_positive("positions.cycle_length", self.cycle_length)
        _check_positive("positions.max_shift", self.max_shift)
        if self.alpha0 < 1:
            raise ValueError(f"positions.alpha0 must be >= 1, got {self.alpha0!r}")
        if self.growth < 1:
            raise ValueError(f"positions.growth must be >= 1, got {self.growth!r}")
        _check_positive("positions.interval", self.interval)
        if self.alpha_max < self.alpha0:
            raise ValueError(f"positions.alpha_max must be >= alpha0={self.alpha0}, got {self.alpha_max!r}")
        if self.inference_alpha is not None and self.inference_alpha < 1:
            raise ValueError(f"positions.inference_alpha must be >= 1 or null, got {self.inference_alpha!r}")


@dataclass
class LoraSettings:
    """Reduced LongLoRA (DESIGN.md) through peft."""

    enabled: bool = True
    """Wrap the model with peft LoRA; false trains every parameter."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (lora_alpha)."""
    dropout: float = 0.0
    """LoRA dropout (0 keeps resumed runs bit-exact without extra RNG bookkeeping)."""
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "o_proj"])
    """Linear layers that get adapters."""
    modules_to_save: list[str] = field(default_factory=lambda: ["embed_tokens", "norm"])
    """Fully trained modules; peft matches by suffix, so 'norm' is every norm layer ('model.norm' only the last)."""

    def __post_init__(self):
        _check_positive("lora.r", self.r)
        _check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.enabled and not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module when lora.enabled is true")


@dataclass
class DataConfig:
    """Training text: tokenised, packed into fixed-length sequences, shuffled from a seed."""

    source: str = "builtin:shakespeare"
    """'builtin:NAME' (ds_msattn.corpora) or a .txt/.jsonl/.json/.parquet file, directory or glob."""
    text_field: str = "text"
    """Column holding the text in jsonl/parquet files."""
    seq_len: int = 1024
    """Tokens per training sequence."""
    tokenizer: str = "model"
    """'model' (the model's tokenizer), 'bytes' (UTF-8 bytes + EOS, for tiny models) or a tokenizer dir/alias."""
    seed: int = 0
    """Seed of the sequence order (one permutation per epoch)."""
    max_documents: int | None = None
    """Use only the first N documents (sorted by name) - for quick runs."""

    def __post_init__(self):
        _check_positive("data.seq_len", self.seq_len)
        if self.max_documents is not None:
            _check_positive("data.max_documents", self.max_documents)


@dataclass
class TrainSettings:
    """Optimisation loop."""

    max_steps: int = 10
    """Optimizer steps to run (in total, counting resumed steps); a resumed run follows this run's LR schedule."""
    micro_batch_size: int = 1
    """Sequences per rank per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_schedule: str = "constant"
    """constant or cosine (after warm-up, to 10% of lr at max_steps)."""
    optimizer: str = "torch_adamw"
    """torch_adamw (no op compile; runs on the offloaded CPU copy) or deepspeed (DeepSpeed's config 'optimizer')."""
    seed: int = 0
    """Seed of torch/numpy/python RNGs on every rank."""
    log_interval: int = 1
    """Steps between progress-bar/console updates (metrics.jsonl gets every step)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    profile_step: int = 0
    """Profile this optimizer step (counted from 1) with torch.profiler on rank 0 and write its operator table to
    <output_dir>/profile_step_N.txt (0: off). Step 1 includes one-time warm-up (ZeRO-3 tracing)."""
    host_mmap_threshold_mib: int = 32
    """glibc (Linux) while training: host tensors of at least this many MiB are mapped and return to the OS when
    freed; smaller ones come from the heap, whose holes stay resident. 32 is where glibc's own rule ends. Lower it
    (e.g. 4) when the host runs out of memory: 10 SmolLM2 layers at 8K tokens peaked at 2816 / 2293 MiB
    (S2-Attn / MS) with 32 and 1223 / 1316 MiB with 4, at 20-29% more time per step
    (benchmarks/results/host_allocator.md)."""

    def __post_init__(self):
        _check_positive("train.max_steps", self.max_steps)
        _check_positive("train.micro_batch_size", self.micro_batch_size)
        _check_positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("train.lr", self.lr)
        _check_positive("train.weight_decay", self.weight_decay, zero_ok=True)
        _check_positive("train.warmup_steps", self.warmup_steps, zero_ok=True)
        _check_choice("train.lr_schedule", self.lr_schedule, {"constant", "cosine"})
        _check_choice("train.optimizer", self.optimizer, {"torch_adamw", "deepspeed"})
        _check_positive("train.log_interval", self.log_interval)
        _check_positive("train.grad_clip", self.grad_clip, zero_ok=True)
        _check_positive("train.profile_step", self.profile_step, zero_ok=True)
        if not 1 <= self.host_mmap_threshold_mib <= 32:  # glibc refuses thresholds above 32 MiB
            raise ValueError(f"train.host_mmap_threshold_mib must be 1-32 (MiB), got {self.host_mmap_threshold_mib!r}")


@dataclass
class CheckpointConfig:
    """Periodic, atomic checkpoints under <output_dir>/checkpoints/step_NNNNNNNN."""

    interval: int = 0
    """Steps between checkpoints (0: only at the end if save_final)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted)."""
    save_final: bool = True
    """Also checkpoint after the last step."""
    export_merged: bool = False
    """After training, write a merged plain-transformers model to <output_dir>/merged."""

    def __post_init__(self):
        _check_positive("checkpoint.interval", self.interval, zero_ok=True)
        _check_positive("checkpoint.keep_last", self.keep_last)


@dataclass
class DeepSpeedSettings:
    """The DeepSpeed engine."""

    config: str = "ds_configs/zero3_offload.json"
    """DeepSpeed JSON (relative paths: to the working directory, else to the package's ds_configs/)."""
    overrides: dict = field(default_factory=dict)
    """Keys merged into the JSON (nested dicts merge), e.g. {bf16: {enabled: false}}."""


@dataclass
class ParallelConfig:
    """Data x sequence parallelism (ds_msattn.parallel), collective timeouts, partitioned loading."""

    sequence_parallel_size: int = 1
    """Ranks that share one sequence (1: off); the rest of the world is data parallel (world / this)."""
    sp_mode: str = "region"
    """region (region sharding) or ulysses."""
    timeout_s: float = 1800.0
    """Collective timeout in seconds (every process group): a rank waiting on a lost peer fails after this."""
    zero_init: bool = True
    """Under ZeRO-3, build the model inside deepspeed.zero.Init (partitioned as built; false: full copy per rank)."""

    def __post_init__(self):
        _check_positive("parallel.sequence_parallel_size", self.sequence_parallel_size)
        _check_choice("parallel.sp_mode", self.sp_mode, {"region", "ulysses"})
        _check_positive("parallel.timeout_s", self.timeout_s)


@dataclass
class RunConfig:
    """A whole fine-tuning run."""

    output_dir: str = "runs/default"
    """Where metrics.jsonl, TensorBoard events, checkpoints and config.yaml go."""
    resume: str = "none"
    """'auto' (newest checkpoint in output_dir if any), 'none', or a checkpoint directory."""
    tensorboard: bool = True
    """Write TensorBoard scalars on rank 0."""
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir must be a non-empty path")
        if self.attention.implementation in SHIFTED_IMPLEMENTATIONS and self.parallel.sequence_parallel_size > 1:
            raise ValueError(
                f"attention.implementation={self.attention.implementation} does not support sequence parallelism "
                f"(parallel.sequence_parallel_size={self.parallel.sequence_parallel_size}): its groups and shifted "
                "heads need the whole sequence on one rank; use parallel.sequence_parallel_size=1 (ZeRO-3 data "
                "parallelism works)")
        if not self.resume:
            raise ValueError("resume must be 'auto', 'none' or a checkpoint directory, got ''")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from dicts, with type checks


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp`; ints are accepted for floats. Returns the value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError:
                pass
        raise ValueError(f"{key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads '1e-4' (no dot) as a string; accept it as the number it spells.
        if isinstance(value, str) and _FLOAT_RE.match(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]} (allowed in this section: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> dict:
    """`['--train.max_steps=3', '--resume', 'auto']` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"overrides must look like --section.key=value, got {arg!r}")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"override --{body} needs a value (--{body}=VALUE)")
            key, raw = body, argv[i + 1]
            i += 1
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key, value)
        i += 1
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return data or {}


def load_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read a YAML/JSON recipe (or defaults when None), apply overrides, type-check and validate."""
    data = read_config_file(path) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = _merge(data, overrides or {})
    return _build(RunConfig, data)


def split_argv(argv: list[str]) -> tuple[str | None, int | None, list[str]]:
    """Pull `--config F` and the launcher's `--local_rank N` out of argv; the rest are overrides."""
    config, local_rank, rest = None, None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, val = arg.partition("=")
        if name in ("--config", "-c", "--local_rank", "--local-rank"):
            if not val:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                val = argv[i + 1]
                i += 1
            if name in ("--config", "-c"):
                config = val
            else:
                try:
                    local_rank = int(val)
                except ValueError as err:
                    raise ValueError(f"--local_rank must be an integer, got {val!r}") from err
        else:
            rest.append(arg)
        i += 1
    return config, local_rank, rest


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
