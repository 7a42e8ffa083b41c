"""Memory planner: will this model, at this length, fit on these GPUs, and with which DeepSpeed config?

Per-GPU memory of one training step (peak), broken down:

- ``parameters``, ``gradients``, ``optimizer_states``: ZeRO model states. For bf16 mixed precision these are
  DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``:
  2 bytes of 16-bit parameter, 2 + 4 bytes of gradients, 4 + 8 bytes of fp32 master and Adam moments per
  trainable parameter; ZeRO-3 adds ``4 * largest_layer_params`` for the gathered layer), split into parts. We
  extend them to LoRA (frozen parameters cost only their 16-bit copy, partitioned under ZeRO-3, replicated under
  ZeRO-2), to pure fp32 (4 + 4 + 8 bytes, no master copy), to NVMe offload, and to ``zero=0`` (plain PyTorch).
- ``activations``: tensors autograd saves, per decoder layer (counted from HF Llama: two RMSNorms, q/k/v/o,
  gated MLP), all layers without activation checkpointing, only each layer's input with it.
- ``layer_backward``: with checkpointing, one layer's recomputed activations; plus the gradients that live
  while one layer runs backward.
- ``logits_and_loss``: ``[T, V]`` logits and the cross-entropy's fp32 log-probabilities and their gradients
  (16 bytes per token and vocabulary entry), or one chunk of them with a chunked loss.
- ``attention_workspace``: MS attention's padded copies, gathered key/value tiles of one chunk
  (``CHUNK_BUDGET``), fp32 dk/dv accumulators and selection scores (``SCORE_BUDGET``); flash SDPA's O(T)
  gradient buffers; the ``[H, T, T]`` matrices of the math path (``eager``); fetched remote regions under
  sequence-parallel region sharding.
- ``overlap_credit``: minus the smaller of ``logits_and_loss`` and ``layer_backward + attention_workspace``:
  the loss tensors are freed before the first layer runs backward, so only the larger of the two is live.
- ``communication_buffers``: ZeRO reduce/prefetch buckets (capped by the parameters they can hold) and
  Ulysses all-to-all buffers.
- ``runtime``: on a GPU, 1 GiB for the CUDA context and library workspaces plus 5% of the dynamic memory for
  allocator fragmentation (assumptions, not measured here); 0 on the CPU device.

On ``device="cpu"`` the planner's ``increment_gib`` is what tests measure: the increase of a process's peak RSS
during one forward + backward + optimizer step in steady state (plain PyTorch with ``zero=0``, or a DeepSpeed
engine with ``ds_configs/zero3_offload_cpu.json``), i.e. the peak less what persists between steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .attention.selection import SCORE_BUDGET
from .attention.torch_path import CHUNK_BUDGET
from .planner_presets import ModelShape, resolve_shape

GIB = 1 << 30
BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory
CUDA_CONTEXT_GIB = 1.0
FRAGMENTATION = 0.05
HOST_RUNTIME_GIB = 0.5  # one process' host memory before the model: Python, torch, DeepSpeed, transformers (CPU)
# (file in ds_configs/, ZeRO stage, offload), fastest first: the order the planner tries them in.
DS_CONFIGS = (
    ("zero3.json", 3, "none"),
    ("zero2_offload.json", 2, "cpu"),
    ("zero3_offload.json", 3, "cpu"),
)
CPU_DS_CONFIG = "zero3_offload_cpu.json"  # fp32 ZeRO-3 offload for CPU-only runs
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
# DeepSpeed's bucket sizes (elements) when a config does not set them.
DEFAULT_BUCKETS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}


def bucket_sizes(ds_config: str | None) -> dict[str, float]:
    """``reduce_bucket_size``, ``allgather_bucket_size``, ``stage3_prefetch_bucket_size`` of a ds_configs/ file."""
    sizes = dict(DEFAULT_BUCKETS)
    path = DS_CONFIG_DIR / ds_config if ds_config else None
    if path is not None and path.is_file():
        zero = json.loads(path.read_text()).get("zero_optimization", {})
        sizes.update({k: float(zero[k]) for k in sizes if isinstance(zero.get(k), (int, float))})
    return sizes


@dataclass
class PlanConfig:
    """One training setting to plan."""

    model: str | ModelShape
    """preset name, directory with config.json, config.json path, or a ModelShape"""
    seq_len: int
    """tokens per sequence (the whole sequence, before sequence-parallel sharding)"""
    gpus: int = 1
    """GPUs per node"""
    gpu_mem_gib: float = 80.0
    """memory of one GPU (GiB)"""
    nodes: int = 1
    sp: int | None = None
    """sequence-parallel size; None: the smallest that fits (a power of two dividing the GPU count)"""
    lora: bool = True
    """reduced LongLoRA (k_proj, o_proj adapters + trainable embeddings and norms); False: full fine-tuning"""
    lora_rank: int = 8
    dtype: str = "bf16"
    zero: int | None = None
    """ZeRO stage 0 (no DeepSpeed), 2 or 3; None: search DS_CONFIGS"""
    offload: str | None = None
    """none, cpu or nvme; None: search DS_CONFIGS"""
    checkpointing: bool = True
    attn: str = "ms_attention"
    """ms_attention, sdpa (flash) or eager (math path, [H, T, T] scores)"""
    region_size: int = 16
    top_k: int = 64
    merge: int = 16
    micro_batch: int = 1
    loss_chunk: int = 2048
    """tokens per chunk of the loss (ds_msattn.train.LOSS_CHUNK); 0: HF's loss, logits of the whole sequence"""
    device: str = "gpu"
    """gpu, or cpu (the measurable setting: no CUDA context, fp32)"""
    optimizer_step: bool = True
    """count optimizer states (False: a forward + backward only)"""
    zero_init: bool = True
    """ZeRO-3 builds the model inside deepspeed.zero.Init (parallel.zero_init); False: a full copy per process first"""

    def __post_init__(self):
        positive = ("seq_len", "gpus", "nodes", "lora_rank", "region_size", "top_k", "merge", "micro_batch")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.gpu_mem_gib, (int, float)) and self.gpu_mem_gib > 0):
            raise ValueError(f"gpu_mem_gib must be a positive number, got {self.gpu_mem_gib!r}")
        choices = {"dtype": ("bf16", "fp32"), "attn": ("ms_attention", "sdpa", "eager"), "device": ("gpu", "cpu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.zero not in (None, 0, 2, 3):
            raise ValueError(f"zero must be 0, 2 or 3 (or None to search), got {self.zero!r}")
        if self.offload not in (None, "none", "cpu", "nvme"):
            raise ValueError(f"offload must be none, cpu or nvme (or None to search), got {self.offload!r}")
        if self.zero == 0 and self.offload not in (None, "none"):
            raise ValueError("offload needs DeepSpeed ZeRO (zero 2 or 3); zero=0 allows offload none only")
        if self.offload == "nvme" and self.zero == 2:
            raise ValueError("offload nvme needs zero 3 (ZeRO-Infinity)")
        if self.sp is not None and (not isinstance(self.sp, int) or self.sp < 1 or (self.gpus * self.nodes) % self.sp):
            raise ValueError(f"sp must be a positive divisor of gpus * nodes = {self.gpus * self.nodes}, got {self.sp!r}")
        if self.merge > self.top_k:
            raise ValueError(f"merge must be <= top_k, got merge={self.merge}, top_k={self.top_k}")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be an integer >= 0, got {self.loss_chunk!r}")
        if isinstance(self.model, str):
            self.model = resolve_shape(self.model)


@dataclass
class Plan:
    """The planner's answer for one setting."""

    fits: bool
    per_gpu_gib: float
    host_gib: float
    """host memory per node"""
    breakdown_gib: dict[str, float]
    ds_config: str | None
    sequence_parallel_size: int
    zero: int
    offload: str
    gpu_mem_gib: float
    increment_gib: float
    """per_gpu_gib less what persists between steps and runtime: what a loaded process grows by during a step
    (the quantity measured on the CPU)"""
    nvme_gib: float = 0.0
    load_host_gib: float = 0.0
    """peak host memory of one process while it loads (model build, peft, DeepSpeed engine), see load_host_bytes"""
    trainable_params: int = 0
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def trainable_params(shape: ModelShape, lora: bool, rank: int) -> int:
    """Trainable parameters: all, or LoRA on k_proj/o_proj plus a trainable copy of embeddings and norms.

    peft's ``modules_to_save`` keeps the frozen original and trains a copy, so the copy adds to the total.
    """
    if not lora:
        return shape.total_params()
    h, d = shape.hidden_size, shape.head_dim
    lora_k = rank * (h + shape.num_kv_heads * d)
    lora_o = rank * (shape.num_heads * d + h)
    norms = (2 * shape.num_layers + 1) * h
    return shape.num_layers * (lora_k + lora_o) + shape.vocab_size * h + norms


def ds_config_name(cfg: PlanConfig, zero: int, offload: str) -> str | None:
    """The file in ds_configs/ for this setting, None where there is none (ZeRO-2 without offload, NVMe)."""
    if cfg.device == "cpu" and (zero, offload) == (3, "cpu"):
        return CPU_DS_CONFIG
    for name, z, o in DS_CONFIGS:
        if (z, o) == (zero, offload):
            return name
    return None


def model_state_bytes(cfg: PlanConfig, zero: int, offload: str, world: int) -> tuple[dict[str, float], float, float]:
    """``({parameters, gradients, optimizer_states}, host bytes per node, nvme bytes)`` per GPU.

    bf16 matches DeepSpeed's estimators for the trainable part (tests check equality for full fine-tuning).
    """
    shape = cfg.model
    total = shape.total_params()
    train = trainable_params(shape, cfg.lora, cfg.lora_rank)
    frozen = total if cfg.lora else 0  # LoRA: the whole base model stays, frozen
    mixed = cfg.dtype == "bf16"
    pb = 2 if mixed else 4  # parameter bytes
    # Gradients: ZeRO-2 keeps a 16-bit and an fp32 copy, ZeRO-3 (and plain PyTorch) one (DeepSpeed's estimators).
    gb = (6 if zero == 2 else 4) if mixed else 4
    ob = (12 if mixed else 8) if cfg.optimizer_step else 0  # fp32 master + Adam moments, or moments
    largest = shape.largest_module_params()
    gpn, nodes = cfg.gpus, cfg.nodes
    states = {"parameters": 0.0, "gradients": 0.0, "optimizer_states": 0.0}
    nvme = 0.0
    if zero == 0:
        states.update(parameters=pb * (train + frozen), gradients=gb * train, optimizer_states=ob * train)
        host = 0.0
    elif zero == 2:
        states["parameters"] = pb * (train + frozen)
        if offload == "none":
            states.update(gradients=gb * train / world, optimizer_states=ob * train / world)
            host = 4 * (train + frozen) * gpn * BUFFER_FACTOR  # DeepSpeed: loading the model, fp32, per process
        else:
            # DeepSpeed: fp32 master + Adam moments + fp32 gradients (16 bytes), at least 4 bytes per GPU
            host = train * max(4 * world, 16 if mixed else 12) * BUFFER_FACTOR
    else:  # ZeRO-3: the gathered layer is 2 buffers of the largest module (DeepSpeed: 4 bytes per parameter)
        gathered = 2 * pb * largest
        if offload == "none":
            states.update(
                parameters=gathered + pb * (train + frozen) / world,
                gradients=gb * train / world,
                optimizer_states=ob * train / world,
            )
            host = 4 * largest * gpn * BUFFER_FACTOR  # zero.Init: one layer in fp32 per process
        else:
            states["parameters"] = gathered  # parameters live on the host (or NVMe), gathered per layer
            per_train = 18 if mixed else 16  # DeepSpeed's 18: 16-bit param + fp32 grad + master + Adam moments
            if offload == "cpu":
                host = (train * per_train + frozen * pb) * BUFFER_FACTOR / nodes
            else:  # NVMe: optimizer states (and parameters) on disk; host keeps gradients and swap buffers
                nvme = (train * (ob + pb) + frozen * pb) / nodes
                host = (train * (gb - pb if mixed else gb) + 8 * pb * largest * gpn) * BUFFER_FACTOR / nodes
    if mixed and zero in (2, 3) and offload != "nvme" and cfg.optimizer_step:
        host = _deepspeed_host_bytes(cfg, zero, offload, train, frozen, largest)
    return states, host, nvme


def load_host_bytes(cfg: PlanConfig, zero: int, world: int) -> float:
    """Peak host bytes of one process while it loads the model (build, peft, ``deepspeed.initialize``).

    - ZeRO-3 with zero.Init: the process holds its 1/world partition of every parameter; the engine allocates, for
      its share of the trainable parameters (peft's ``modules_to_save`` copies are partitioned as peft makes them,
      ``ds_msattn.parallel.zero.partitioned_peft_copies``), the flat parameter partition, the fp32 master, the
      fp32 gradient partition and one more flat buffer (16 bytes per trainable parameter / world, measured:
      4.0 x 4 bytes), then gathers each trainable parameter to register its gradient hook: the largest (with
      LoRA the embedding copy) full twice, the gathered tensor and gloo's buffer of the same size (measured:
      +500 MiB for a 250 MiB embedding). That is the peak; the build's one module full next to its partition
      comes earlier.
    - otherwise each process holds a full copy, and peft's ``modules_to_save`` copies (embeddings, norms) are
      full as well until the engine partitions them; the engine's buffers then reuse the memory freed by
      partitioning the full copy (measured: 4 bytes per trainable parameter / world remain).
    Plus the process runtime (Python, torch, DeepSpeed, transformers, gloo: ``HOST_RUNTIME_GIB``, measured on CPU).
    Measured for a 1.2B Llama on 2 CPU ranks in benchmarks/results/load_memory.md.
    """
    s = cfg.model
    pb = 2 if cfg.dtype == "bf16" else 4
    total = s.total_params()
    train = trainable_params(s, cfg.lora, cfg.lora_rank)
    if zero == 3 and cfg.zero_init:
        held = pb * total / world + 2 * pb * s.largest_module_params() + 16 * train / world
    else:
        held = pb * total + (pb * train if cfg.lora else 0.0) + (4 * train / world if zero in (2, 3) else 0.0)
    return HOST_RUNTIME_GIB * GIB + held


def _deepspeed_host_bytes(cfg: PlanConfig, zero: int, offload: str, train: int, frozen: int, largest: int) -> float:
    """Host memory per node from DeepSpeed's estimators (trainable part), plus frozen LoRA base parameters."""
    if zero == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        loaded = train + frozen if offload == "none" else train  # without offload: the whole model is loaded
        cpu, _ = estimate_zero2_model_states_mem_needs(
            loaded, num_gpus_per_node=cfg.gpus, num_nodes=cfg.nodes, cpu_offload=offload == "cpu",
            additional_buffer_factor=BUFFER_FACTOR,
        )
        return float(cpu)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, _, _ = estimate_zero3_model_states_mem_needs(
        train, largest, num_gpus_per_node=cfg.gpus, num_nodes=cfg.nodes, cpu_offload=offload == "cpu",
        cpu_offload_params=offload == "cpu", zero_init=True, additional_buffer_factor=BUFFER_FACTOR,
    )
    if offload == "cpu":  # frozen parameters are offloaded too: their 16-bit copy
        cpu += frozen * 2 * BUFFER_FACTOR / cfg.nodes
    return float(cpu)


def _per_token_layer_bytes(cfg: PlanConfig, T: int) -> float:
    """Bytes autograd saves per token in one decoder layer (HF Llama layer, counted tensor by tensor)."""
    s = cfg.model
    b = 2 if cfg.dtype == "bf16" else 4
    h, i, H, Hkv, D = s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.head_dim
    # RMSNorm: its fp32 input (a copy under bf16), the normalised value in the model dtype, the weighted output,
    # and the fp32 rsqrt; two per layer.
    norms = 2 * ((4 + 2 * b) * h + 4)
    # q and k after RoPE, v, and the attention output reshaped for o_proj.
    attn = b * (2 * H * D + 2 * Hkv * D)
    if cfg.attn == "sdpa":
        attn += 4 * H  # log-sum-exp
    elif cfg.attn == "ms_attention":
        blocks_per_token = 1 / (cfg.merge * cfg.region_size)
        attn += 4 * H + b * H * D + 8 * H * (cfg.top_k - cfg.merge) * blocks_per_token  # lse, own output, sel
    else:  # eager: softmax probabilities (fp32, plus a copy in the model dtype), k/v repeated to all heads
        attn += H * T * (4 + (b if b != 4 else 0)) + (2 * (H - Hkv) * D * b)
    mlp = 4 * i * b  # gate out, SiLU out, up out, product
    lora = 2 * cfg.lora_rank * b if cfg.lora else 0
    return norms + attn + mlp + lora


def attention_workspace_bytes(cfg: PlanConfig, tokens: int, seq_len: int, sp: int) -> tuple[float, float]:
    """Transient attention memory of one layer on the local shard: ``(forward, backward)`` bytes."""
    s = cfg.model
    b = 2 if cfg.dtype == "bf16" else 4
    B, H, Hkv, D = cfg.micro_batch, s.num_heads, s.num_kv_heads, s.head_dim
    T = tokens
    if cfg.attn == "sdpa":
        # flash backward: dq, dk, dv (dk/dv per query head before the GQA sum) and an fp32 dq accumulator
        # (Ulysses' all-to-all copies of q, k, v, o are in communication_buffers)
        return 0.0, B * T * D * (b * 3 * H + 4 * H)
    if cfg.attn == "eager":
        scores = B * H * T * seq_len * 4
        return scores, 2 * scores  # forward: the scores; backward: gradients of the probabilities and scores
    c, m, K = cfg.region_size, cfg.merge, cfg.top_k
    mc = m * c
    NB = math.ceil(T / mc)
    Tp = NB * mc
    keys = K * c  # selected regions plus own block, per query block
    nb = min(NB, max(1, CHUNK_BUDGET // (B * H * keys * D)))
    tile = B * H * nb * keys * D  # elements of one gathered key (or value) tile
    padded = b * B * Tp * D * (2 * H + 2 * Hkv)  # contiguous copies of q, k, v and of the output gradient
    grads = B * Tp * D * (b * H + 8 * Hkv + (2 * b * Hkv if b != 4 else 0))  # dq, fp32 dk/dv, their casts
    chunk = 6 * tile * b + nb * mc * keys * b  # gathered k, v, their gradients, index_add copies; the mask
    backward = padded + grads + chunk
    R = math.ceil(seq_len / c)  # selection scores every region of the whole sequence
    score_elems = min(B * H * NB * m * R, max(SCORE_BUDGET, B * H * m * R))
    selection = 32 * score_elems + b * B * Tp * D * (H + 2 * Hkv)
    forward = max(selection, padded * 3 // 4 + 2 * tile * b + nb * mc * keys * b)
    if sp > 1:  # region sharding: keys and values fetched from other ranks (and their fp32 gradients)
        fetched = min(seq_len - T, NB * (H // Hkv) * (K - m) * c)
        forward += B * Hkv * fetched * D * 2 * b + 4 * B * Hkv * R * D
        backward += B * Hkv * fetched * D * 2 * (b + 4) + 4 * B * Hkv * R * D
    return forward, backward


def _logits_bytes(cfg: PlanConfig, tokens: int) -> float:
    """Logits, fp32 log-probabilities, and their gradients: 16 bytes per token and vocabulary entry."""
    n = tokens if cfg.loss_chunk == 0 else min(tokens, cfg.loss_chunk)
    b = 2 if cfg.dtype == "bf16" else 4
    return cfg.micro_batch * (16 * n * cfg.model.vocab_size + 2 * b * tokens * cfg.model.hidden_size)


def plan_one(cfg: PlanConfig, zero: int, offload: str, sp: int) -> Plan:
    """Evaluate exactly one (ZeRO stage, offload, sequence-parallel size)."""
    s = cfg.model
    world = cfg.gpus * cfg.nodes
    b = 2 if cfg.dtype == "bf16" else 4
    B, L, h = cfg.micro_batch, s.num_layers, s.hidden_size
    tokens = math.ceil(cfg.seq_len / sp)
    if cfg.attn == "ms_attention" and sp > 1:  # shards are whole query blocks
        mc = cfg.merge * cfg.region_size
        tokens = math.ceil(tokens / mc) * mc
    states, host, nvme = model_state_bytes(cfg, zero, offload, world)
    per_token = _per_token_layer_bytes(cfg, cfg.seq_len)
    layer = per_token * B * tokens  # one layer's saved activations
    final_norm = B * tokens * ((4 + 2 * b) * h + 4)
    activations = (L * b * B * tokens * h if cfg.checkpointing else L * layer) + final_norm
    ws_forward, ws_backward = attention_workspace_bytes(cfg, tokens, cfg.seq_len, sp)
    # A layer's backward: MLP first (gradients of three [T, i] and two [T, h] tensors alive), then attention
    # (its workspace, once the MLP's four saved [T, i] tensors are freed).
    mlp_saved = 4 * s.intermediate_size * b * B * tokens
    transient = max(b * (2 * s.intermediate_size + 2 * h) * B * tokens, ws_backward - mlp_saved)
    layer_backward = (layer if cfg.checkpointing else 0) + transient
    logits = _logits_bytes(cfg, tokens)
    train = trainable_params(s, cfg.lora, cfg.lora_rank)
    comm = 0.0
    ds_config = ds_config_name(cfg, zero, offload)
    buckets = bucket_sizes(ds_config)
    if zero == 2:
        comm = b * (min(buckets["reduce_bucket_size"], train) + min(buckets["allgather_bucket_size"], train))
    elif zero == 3:
        comm = b * (min(buckets["reduce_bucket_size"], train) + min(buckets["stage3_prefetch_bucket_size"], s.total_params()))
    if sp > 1 and cfg.attn == "sdpa":
        comm += 2 * b * B * tokens * (2 * s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    # Peak = persistent states + the largest of the step's phases. Under ZeRO the gradient buffers persist;
    # without DeepSpeed (zero=0) gradients appear during backward as activations are freed: the output head's
    # and one layer's at the phases below, all of them at the end.
    grads = states["gradients"]
    if zero == 0:
        gpb = grads / max(1, train)  # bytes per trainable parameter
        lm_head = 0 if cfg.lora else s.vocab_size * h  # its gradient comes first; the embedding's comes last
        head_grads = gpb * (lm_head + h)
        layer_grads = gpb * (s.layer_params() if not cfg.lora else (train - s.vocab_size * h - h) / L)
        persistent_grads = 0.0
    else:
        head_grads = layer_grads = 0.0
        persistent_grads = grads
    phases = {
        "forward": activations + ws_forward,
        "loss": activations + logits + head_grads,
        "layer_backward": activations + layer_backward + head_grads + layer_grads,
        "end_of_backward": grads,
    }
    peak_dynamic = max(phases.values())
    persistent = states["parameters"] + states["optimizer_states"] + persistent_grads + comm
    breakdown = dict(
        states,
        activations=activations,
        layer_backward=layer_backward,
        logits_and_loss=logits,
        attention_workspace=max(ws_forward, ws_backward),
        communication_buffers=comm,
    )
    peak = persistent + peak_dynamic
    breakdown["overlap_credit"] = peak - sum(breakdown.values())  # phases that never coexist (<= 0)
    runtime = 0.0 if cfg.device == "cpu" else CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * (peak - states["parameters"])
    breakdown["runtime"] = runtime
    per_gpu = peak + runtime
    # What a loaded process in steady state grows by during one step: everything but what persists between
    # steps (parameter partitions, optimizer states, ZeRO's gradient partitions and buckets); ZeRO-3's gathered
    # layer is allocated and released within the step.
    gathered = 2 * b * s.largest_module_params() if zero == 3 else 0.0
    increment = peak - persistent + gathered
    notes = []
    if cfg.attn == "sdpa" and sp > 1 and (s.num_heads % sp or s.num_kv_heads % sp):
        notes.append(f"Ulysses needs head counts divisible by sp={sp} (heads {s.num_heads}/{s.num_kv_heads})")
    fits = per_gpu <= cfg.gpu_mem_gib * GIB and not notes
    return Plan(
        fits=bool(fits),
        per_gpu_gib=round(per_gpu / GIB, 3),
        host_gib=round(host / GIB, 3),
        breakdown_gib={k: round(v / GIB, 3) for k, v in breakdown.items()},
        ds_config=ds_config,
        sequence_parallel_size=sp,
        zero=zero,
        offload=offload,
        gpu_mem_gib=cfg.gpu_mem_gib,
        increment_gib=round(increment / GIB, 4),
        nvme_gib=round(nvme / GIB, 3),
        load_host_gib=round(load_host_bytes(cfg, zero, world) / GIB, 3),
        trainable_params=train,
        total_params=s.total_params(),
        notes=notes,
    )


def check_fit(cfg: PlanConfig) -> Plan:
    """Plan ``cfg``; where ``zero``/``offload``/``sp`` are None, search for the first setting that fits.

    Sequence-parallel sizes are tried smallest first (powers of two dividing the GPU count), and for each the
    configs of :data:`DS_CONFIGS` cheapest first. Without a fit, the plan of the last candidate is returned
    (``fits`` False): the most memory-frugal setting tried.
    """
    world = cfg.gpus * cfg.nodes
    sps = [cfg.sp] if cfg.sp else [p for p in (2**e for e in range(world.bit_length())) if world % p == 0]
    if cfg.zero == 0:
        configs = [(None, 0, "none")]
    else:
        configs = [
            c for c in DS_CONFIGS if cfg.zero in (None, c[1]) and (cfg.offload is None or cfg.offload == c[2])
        ]
    if not configs:  # a setting without a file in ds_configs/ (ZeRO-2 without offload, NVMe): plan it anyway
        configs = [(None, cfg.zero or 3, cfg.offload or "none")]
    last = None
    for sp in sps:
        for _, zero, offload in configs:
            last = plan_one(cfg, zero, offload, sp)
            if last.fits:
                return last
    return last


def _parser() -> argparse.ArgumentParser:
    from .logs import OneLineArgumentParser  # errors as one line, exit code 2

    p = OneLineArgumentParser(prog="ds-msattn plan", description="Will this model, at this length, fit?")
    p.add_argument("--model", required=True, help="preset (llama2-7b, ...), model directory or config.json")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel size (default: smallest that fits)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True)
    mode.add_argument("--full", dest="lora", action="store_false")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--zero", type=int, choices=(0, 2, 3), default=None)
    p.add_argument("--offload", choices=("none", "cpu", "nvme"), default=None)
    p.add_argument("--checkpointing", choices=("on", "off"), default="on")
    p.add_argument("--attn", choices=("ms_attention", "sdpa", "eager"), default="ms_attention")
    p.add_argument("--region-size", type=int, default=16)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--merge", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--loss-chunk", type=int, default=2048,
                   help="tokens per loss chunk (ds_msattn.train chunks by 2048; 0: unchunked, as HF's own loss)")
    p.add_argument("--no-zero-init", dest="zero_init", action="store_false",
                   help="ZeRO-3 without deepspeed.zero.Init (parallel.zero_init: false): each process loads a full copy")
    p.add_argument("--json", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    return PlanConfig(
        model=args.model,
        seq_len=args.seq_len,
        gpus=args.gpus,
        gpu_mem_gib=args.gpu_mem,
        nodes=args.nodes,
        sp=args.sp,
        lora=args.lora,
        dtype=args.dtype,
        zero=args.zero,
        offload=args.offload,
        checkpointing=args.checkpointing == "on",
        zero_init=args.zero_init,
        attn=args.attn,
        region_size=args.region_size,
        top_k=args.top_k,
        merge=args.merge,
        micro_batch=args.micro_batch,
        loss_chunk=args.loss_chunk,
    )


def format_plan(cfg: PlanConfig, plan: Plan) -> str:
    mode = "LoRA" if cfg.lora else "full"
    lines = [
        f"{cfg.model.name}, {cfg.seq_len} tokens, {mode} {cfg.dtype}, {cfg.attn}, checkpointing "
        f"{'on' if cfg.checkpointing else 'off'}, {cfg.gpus} GPU(s) x {cfg.nodes} node(s) of {cfg.gpu_mem_gib:g} GiB",
        f"  ZeRO-{plan.zero} offload {plan.offload}, sequence parallel {plan.sequence_parallel_size}"
        f" -> ds_configs/{plan.ds_config}" if plan.ds_config else f"  no DeepSpeed, sequence parallel {plan.sequence_parallel_size}",
    ]
    for key, value in plan.breakdown_gib.items():
        lines.append(f"  {key:<22} {value:10.3f} GiB")
    lines.append(f"  {'per GPU':<22} {plan.per_gpu_gib:10.3f} GiB of {cfg.gpu_mem_gib:g}")
    lines.append(f"  {'host per node':<22} {plan.host_gib:10.3f} GiB" + (f" (+ NVMe {plan.nvme_gib:.1f} GiB)" if plan.nvme_gib else ""))
    lines.append(f"  {'host per process, load':<22} {plan.load_host_gib:10.3f} GiB"
                 + ("" if plan.zero == 3 and cfg.zero_init else " (full copy per process)"))
    lines += [f"  note: {n}" for n in plan.notes]
    lines.append("  verdict: " + ("FITS" if plan.fits else "DOES NOT FIT"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        # DeepSpeed logs its accelerator choice to stdout on import; keep stdout for the plan (--json).
        with contextlib.redirect_stdout(io.StringIO()):
            plan = check_fit(cfg)
    except ValueError as err:
        print(f"ds-msattn plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(cfg, plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
