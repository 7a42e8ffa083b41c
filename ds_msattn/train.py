"""Fine-tuning entry point: `python -m ds_msattn.train --config F [--section.key=value ...]`.

Also `ds-msattn train --config F ...` and `deepspeed --num_gpus N --module ds_msattn.train --config F ...`
(the launcher appends --local_rank). Flow: parse -> init distributed (gloo on CPU, NCCL on GPU, through
DeepSpeed) -> build (model with the attention from `attention`, CRD-NTK rope, peft LoRA, DeepSpeed engine)
-> train -> checkpoint/export -> `parallel.exit.exit_rank`: release DeepSpeed's shared-memory segment, destroy the
process group, `os._exit` (gloo threads can abort a normal interpreter exit, so `main` never returns once
distributed was initialised).

Per optimizer step rank 0 appends `{"step", "loss", "lr", "tokens_per_s", ...}` to <output_dir>/metrics.jsonl
(step counts from 1, loss is the mean token loss of the global batch) and writes TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import SHIFTED_IMPLEMENTATIONS, RunConfig, load_config, save_config, split_argv
from .data import IGNORE_INDEX, ResumableLoader, build_dataset, load_tokenizer
from .parallel.zero import loading_allocator, partitioned_loading, partitioned_peft_copies
from .positions import CrdNtkSchedule, set_inference_positions

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
LOSS_CHUNK = 1024  # tokens per lm_head + cross-entropy chunk: logits are never [T, vocab] at once


# ------------------------------------------------------------------ distributed set-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_distributed_env(local_rank: int | None = None) -> None:
    """Fill RANK/WORLD_SIZE/... so a plain `python -m ds_msattn.train` is a world of one (no MPI discovery).

    Launchers (deepspeed, torchrun) set them; SLURM's srun sets only SLURM_*, mapped here; mpirun is left to
    DeepSpeed's MPI discovery.
    """
    env = os.environ
    if local_rank is not None:
        env.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" in env or "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=env.get("LOCAL_RANK", "0"))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(cfg: RunConfig) -> None:
    """DeepSpeed's init (gloo on CPU, NCCL on GPU) with every collective timing out after parallel.timeout_s.

    Process groups created later (DeepSpeed's sequence-parallel groups) take torch's default timeout, not the
    world group's, so the default is set as well: a rank blocked on a lost or hung peer raises, never hangs.
    """
    import deepspeed
    import torch.distributed.distributed_c10d as c10d
    from deepspeed.accelerator import get_accelerator

    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=timeout)


def _all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------ model


def build_model(cfg: RunConfig, ds_config: dict | None = None) -> torch.nn.Module:
    """The causal LM with the configured attention implementation and `config.ms_attention` set.

    With a ZeRO-3 `ds_config` (and `parallel.zero_init`) the model is built inside `deepspeed.zero.Init`: every
    module is partitioned over the ranks as soon as it exists, so no rank holds the whole model (a tiny model is
    built empty and each rank fills its own partitions of the seeded random init; `from_pretrained` scatters each
    tensor).
    """
    from .parallel.zero import partitioned_empty_build, partitioned_loading

    dtype = getattr(torch, cfg.model.dtype)
    impl = cfg.attention.implementation
    ms = cfg.attention.ms_attention_dict()
    # s2_attention / sf_attention read their parameters from config.shifted_attention (ds_msattn.hf_shifted)
    extra = {"shifted_attention": cfg.attention.shifted.model_dict()} if impl in SHIFTED_IMPLEMENTATIONS else {}
    if cfg.model.name == "tiny":
        from transformers import AutoModelForCausalLM

        from .models import init_weights_seeded, tiny_llama_config

        config = tiny_llama_config(**cfg.model.tiny)
        config.ms_attention = ms
        for key, value in extra.items():
            setattr(config, key, value)
        with partitioned_empty_build(ds_config, cfg.parallel.zero_init):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=dtype)
        # the same weights however the model was built (plain, or partitioned on any world size)
        init_weights_seeded(model, cfg.model.init_seed)
    else:
        from .models import load_model

        with partitioned_loading(ds_config, cfg.parallel.zero_init):
            model = load_model(cfg.model.name, attn_implementation=impl, ms_attention=ms, dtype=dtype, **extra)
    if getattr(model.config, "attention_dropout", 0.0):
        model.config.attention_dropout = 0.0  # MS attention has no dropout; keeps resumed runs exact
    model.config.use_cache = False
    return model


class TokenLossModel(torch.nn.Module):
    """Wraps the (peft) causal LM so the DeepSpeed engine's forward returns the local token-loss sum and count.

    forward(input_ids [B, T], labels [B, T] (already shifted), position_ids [B, T]) -> (loss_sum [], count []).
    The lm_head and cross-entropy run in checkpointed chunks of LOSS_CHUNK tokens: a [T, vocab] fp32 logits
    tensor (3.2 GB at 16K x 49K) never exists.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, labels, position_ids):
        lm = self.causal_lm()
        # An explicit all-ones mask: without it transformers reads wrapped (cyclic) position_ids as packed
        # documents and would mask attention across the wrap point.
        mask = torch.ones_like(input_ids)
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False,
                          positions_wrapped=True).last_hidden_state  # [B, T, hidden]
        head = lm.get_output_embeddings()

        def chunk_loss(h, y):
            logits = head(h).float()  # [B, chunk, vocab]
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        for h, y in zip(hidden.split(LOSS_CHUNK, dim=1), labels.split(LOSS_CHUNK, dim=1)):
            if torch.is_grad_enabled():
                loss_sum = loss_sum + torch.utils.checkpoint.checkpoint(chunk_loss, h, y, use_reentrant=False)
            else:
                loss_sum = loss_sum + chunk_loss(h, y)
        count = (labels != IGNORE_INDEX).sum()
        return loss_sum, count


# ------------------------------------------------------------------ DeepSpeed config, optimizer, schedule


def resolve_path(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if (PACKAGE_ROOT / p).is_file():
        return PACKAGE_ROOT / p
    raise ValueError(f"deepspeed.config: no such file {path!r}")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON with the run's batch, clipping and optimizer settings applied."""
    ds = json.loads(resolve_path(cfg.deepspeed.config).read_text())
    ds = _deep_merge(ds, cfg.deepspeed.overrides)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x DP size
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps
    ds["gradient_clipping"] = cfg.train.grad_clip
    if cfg.train.optimizer == "torch_adamw":
        ds.pop("optimizer", None)
        # A client torch optimizer with ZeRO offload is refused unless this is false (docs/facts.md).
        ds["zero_force_ds_cpu_optimizer"] = False
    else:
        if "optimizer" not in ds:
            raise ValueError("train.optimizer='deepspeed' needs an 'optimizer' section in deepspeed.config")
        ds["optimizer"].setdefault("params", {}).update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return ds


def lr_lambda(cfg: RunConfig):
    warm, total = cfg.train.warmup_steps, cfg.train.max_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.train.lr_schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


# ------------------------------------------------------------------ checkpoints


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def find_resume_dir(cfg: RunConfig) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        done = sorted(p for p in checkpoint_root(cfg).glob("step_*") if (p / "trainer_state.json").is_file())
        return done[-1] if done else None
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"resume: {cfg.resume!r} is not a checkpoint directory (no trainer_state.json)")
    return path


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(engine, cfg: RunConfig, step: int, loader: ResumableLoader, rank: int) -> Path:
    """Atomic: every rank writes into a temp dir, rank 0 adds trainer_state.json and renames it into place."""
    root = checkpoint_root(cfg)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        state = {"step": step, "loader": loader.state_dict(), "world_size": _world_size(),
                 "global_batch": global_batch(cfg), "max_steps": cfg.train.max_steps}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file())
        for old in done[: -cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: Path, loader: ResumableLoader, rank: int, tag: str = "ds") -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {path}/{tag}")
    loader.load_state_dict(state["loader"])
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"])


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def global_batch(cfg: RunConfig) -> int:
    """Sequences per optimizer step over the whole job (an SP group shares one sequence)."""
    dp = _world_size() // cfg.parallel.sequence_parallel_size
    return cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * dp


def prepare_resume(path: Path, cfg: RunConfig, ds_config: dict, rank: int, world: int) -> str | None:
    """Before the engine exists: for a checkpoint of another world size, the tag of its universal copy.

    A checkpoint written by N ranks is converted once (rank 0, `ds_to_universal`, into <ckpt>/ds_universal) and
    loaded with DeepSpeed's `load_universal`, which re-partitions parameters and optimizer states for this world
    size. Returns None when the world size is the checkpoint's (the exact, ordinary load).
    """
    state = json.loads((path / "trainer_state.json").read_text())
    saved = int(state.get("world_size") or len(list(path.glob("rng_rank*.pt"))) or world)
    if saved == world:
        return None
    from .parallel.zero import to_universal

    if rank == 0:
        print(f"[ds_msattn] resuming a checkpoint of {saved} ranks on {world}: DeepSpeed universal checkpoint "
              f"({path / 'ds_universal'})", flush=True)
        if state.get("global_batch") not in (None, global_batch(cfg)):
            print(f"[ds_msattn] WARNING: the checkpoint's global batch was {state['global_batch']} sequences, this "
                  f"run's is {global_batch(cfg)} (train.micro_batch_size x gradient_accumulation_steps x data-"
                  "parallel ranks): the data continues where it stopped, but the steps differ", flush=True)
        to_universal(path / "ds", path / "ds_universal")
    _barrier()
    ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return "ds_universal"


def restart_schedule(scheduler, cfg: RunConfig, start: int) -> None:
    """After a resume: the learning rate of this run's schedule at step `start`, not the checkpoint's.

    DeepSpeed restores the optimizer's param groups, whose lr the old schedule set for the next step; with a
    different train.max_steps (or warm-up) that value belongs to the old schedule. The schedule's function is this
    run's (`lr_lambda(cfg)`); only its position comes from the checkpoint.
    """
    factor = lr_lambda(cfg)(start)
    optimizer = scheduler.optimizer
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.train.lr
        group["lr"] = cfg.train.lr * factor
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    scheduler.last_epoch = start
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ------------------------------------------------------------------ training


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sequence_parallel(cfg: RunConfig, model):
    if cfg.parallel.sequence_parallel_size == 1:
        return None
    try:
        from .parallel.api import setup_sequence_parallel
    except ImportError as err:
        raise NotImplementedError(
            f"parallel.sequence_parallel_size={cfg.parallel.sequence_parallel_size} needs "
            f"ds_msattn.parallel.api.setup_sequence_parallel, which is not available ({err})") from err
    return setup_sequence_parallel(cfg, model)


def warn_if_it_will_not_fit(cfg: RunConfig, hf_config, ds_config: dict, world: int) -> None:
    """Rank 0: run the memory planner on this setting and warn when it predicts the run will not fit."""
    from .planner import PlanConfig, check_fit
    from .planner_presets import shape_from_config

    zero = ds_config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") if zero.get("stage", 0) else "none"
    if torch.cuda.is_available():
        device, memory = "gpu", torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        device, memory = "cpu", psutil.virtual_memory().total / max(1, local)
    attention = cfg.attention
    plan = check_fit(PlanConfig(
        model=shape_from_config(hf_config), seq_len=cfg.data.seq_len, gpus=world, gpu_mem_gib=memory / 2**30,
        sp=cfg.parallel.sequence_parallel_size, lora=cfg.lora.enabled,
        dtype="bf16" if cfg.model.dtype == "bfloat16" else "fp32", zero=int(zero.get("stage", 0)),
        offload=offload if offload in ("none", "cpu", "nvme") else "none",
        checkpointing=cfg.model.gradient_checkpointing, attn=attention.implementation,
        region_size=attention.region_size, top_k=attention.top_k, merge=attention.merge, device=device))
    if not plan.fits:
        print(f"[ds_msattn] WARNING: the memory planner predicts {plan.per_gpu_gib:.1f} GiB per "
              f"{'GPU' if device == 'gpu' else 'rank'} against {plan.gpu_mem_gib:.1f} GiB available: this run may not "
              f"fit (see `ds-msattn plan --help`; breakdown {plan.breakdown_gib})", flush=True)


def train(cfg: RunConfig) -> None:
    import deepspeed
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    ds_config = deepspeed_config(cfg)
    if cfg.parallel.sequence_parallel_size > 1:
        ds_config["sequence_parallel_size"] = cfg.parallel.sequence_parallel_size
    resume_dir = find_resume_dir(cfg)
    universal = None
    if resume_dir is not None:
        universal = prepare_resume(resume_dir, cfg, ds_config, rank, world)
    loading_allocator(True)  # until the engine holds its partitions (see ds_msattn.parallel.zero)
    model = build_model(cfg, ds_config)
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_config = model.config
    schedule = CrdNtkSchedule.from_config(cfg.positions) if cfg.positions.enabled else None
    if schedule is not None:
        schedule.apply(model, hf_config, 0)  # crd_ntk rope before peft wraps the model
    if cfg.lora.enabled:
        from .lora import apply_reduced_lora

        torch.manual_seed(cfg.model.init_seed + 1)
        # peft's modules_to_save copies of partitioned modules: made without gathering, partitioned at once
        with partitioned_loading(ds_config, cfg.parallel.zero_init), \
                partitioned_peft_copies(model, cfg.lora.modules_to_save):
            model = apply_reduced_lora(model, cfg.lora)

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.name)
    if len(tokenizer) > hf_config.vocab_size:
        raise ValueError(f"data.tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{hf_config.vocab_size} (model.tiny.vocab_size for a tiny model)")

    wrapper = TokenLossModel(model)
    sp = _sequence_parallel(cfg, wrapper)
    init_kwargs = {}
    if sp is not None:
        sp.update_ds_config(ds_config)
        init_kwargs = sp.initialize_kwargs()
    if rank == 0 and cfg.attention.implementation in ("ms_attention", "sdpa", "eager"):
        warn_if_it_will_not_fit(cfg, hf_config, ds_config, world)
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = None
    if cfg.train.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                      betas=(0.9, 0.95), eps=1e-8)
    factor = lr_lambda(cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapper, optimizer=optimizer, model_parameters=trainable if optimizer is None else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), config=ds_config, **init_kwargs)
    loading_allocator(False, cfg.train.host_mmap_threshold_mib)
    device = engine.device
    # from_pretrained returns a model in eval mode, where transformers skips activation checkpointing;
    # train mode changes nothing else here (no dropout: attention_dropout is 0, LoRA dropout defaults to 0)
    engine.train()
    progress = None
    if rank == 0:  # layer passes inside a long step, with the time left (ds_msattn/progress.py)
        from .progress import StepProgress

        progress = StepProgress(wrapper.causal_lm().model.layers, micro_batches=cfg.train.gradient_accumulation_steps,
                                total_steps=cfg.train.max_steps, interval=60.0)

    if sp is not None:
        dp_rank, dp_size = getattr(sp, "dp_rank", rank // cfg.parallel.sequence_parallel_size), \
            getattr(sp, "dp_size", world // cfg.parallel.sequence_parallel_size)
    else:
        dp_rank, dp_size = rank, world
    dataset = build_dataset(cfg.data, tokenizer)
    loader = ResumableLoader(dataset, micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank,
                             dp_size=dp_size, seed=cfg.data.seed)

    start = 0
    if resume_dir is not None:
        start = load_checkpoint(engine, resume_dir, loader, rank, tag=universal or "ds")
        restart_schedule(scheduler, cfg, start)
    torch.manual_seed(cfg.train.seed + 1000 * rank + start)  # dropout-free here, but seeded per rank and step

    metrics_path = out / "metrics.jsonl"
    writer = bar = None
    if rank == 0:
        if metrics_path.exists():  # drop lines of steps after the checkpoint we resume from
            kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not sys.stderr.isatty() and os.environ.get("DS_MSATTN_PROGRESS") != "1")

    gas = cfg.train.gradient_accumulation_steps
    seq_len = cfg.data.seq_len
    tokens_per_step = cfg.train.micro_batch_size * gas * dp_size * seq_len  # global batch (an SP group shares one)
    for step in range(start, cfg.train.max_steps):
        profiler = start_profile(cfg, step, rank)
        t0 = time.perf_counter()
        if progress is not None:
            progress.begin(step)
        if schedule is not None:
            schedule.apply(engine.module, hf_config, step)
        lr = engine.get_lr()[0]
        step_sum = torch.zeros((), dtype=torch.float64)
        step_count = torch.zeros((), dtype=torch.float64)
        for _ in range(gas):
            batch = loader.next_batch()
            bsz = batch["input_ids"].shape[0]
            if schedule is not None:
                batch["position_ids"] = schedule.position_ids(bsz, seq_len, step)
            else:
                batch["position_ids"] = torch.arange(seq_len).expand(bsz, seq_len)
            batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
            if sp is not None:
                batch = sp.shard_batch(batch)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, count = engine(batch["input_ids"], batch["labels"], batch["position_ids"])
            if sp is not None:
                loss = sp.reduce_loss(loss_sum, count)
                # global token-mean of this micro-batch; micro-batches of a step hold equal token counts
                mean = torch.as_tensor(sp.logged_loss(loss_sum.detach(), count), dtype=torch.float64).cpu()
                totals = torch.stack([mean, torch.ones((), dtype=torch.float64)])
            else:
                totals = _all_reduce_sum(torch.stack([loss_sum.detach().double().cpu(), count.double().cpu()]))
                # Token-weighted mean over the global micro-batch; DeepSpeed averages gradients over DP ranks,
                # hence the factor dp_size. (Equal counts per micro-step -> the mean over the step, too.)
                loss = loss_sum * dp_size / totals[1].clamp(min=1).item()
            engine.backward(loss)
            engine.step()
            step_sum += totals[0].double().cpu()
            step_count += totals[1].double().cpu()
        elapsed = time.perf_counter() - t0
        if profiler is not None:
            write_profile(profiler, out / f"profile_step_{step + 1}.txt", elapsed)
        if progress is not None:
            progress.end()
        if rank == 0:
            mean_loss = (step_sum / step_count.clamp(min=1)).item()
            record = {
                "step": step + 1,
                "loss": mean_loss,
                "lr": lr,
                "tokens_per_s": tokens_per_step / elapsed,
                "tokens": tokens_per_step,
                "step_time_s": elapsed,
                "peak_memory_mib": peak_memory_mib(),
            }
            if schedule is not None:
                record.update(alpha=schedule.current_alpha, shift=schedule.shift(step))
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key in ("loss", "lr", "tokens_per_s", "peak_memory_mib", "step_time_s"):
                    writer.add_scalar(f"train/{key}", record[key], step + 1)
                writer.flush()
            if bar is not None:
                bar.update(1)
                if (step + 1) % cfg.train.log_interval == 0:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if bar is None or bar.disable:
                if (step + 1) % cfg.train.log_interval == 0:
                    print(f"step {step + 1}/{cfg.train.max_steps} loss {mean_loss:.4f} lr {lr:.3g} "
                          f"tok/s {record['tokens_per_s']:.0f} {elapsed:.2f}s", flush=True)
        is_last = step + 1 == cfg.train.max_steps
        if (cfg.checkpoint.interval and (step + 1) % cfg.checkpoint.interval == 0) or (
                is_last and cfg.checkpoint.save_final):
            save_checkpoint(engine, cfg, step + 1, loader, rank)
    if bar is not None:
        bar.close()
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    if cfg.lora.enabled:
        save_adapter(engine, cfg, rank)
    if cfg.checkpoint.export_merged:
        export(engine, cfg, hf_config, schedule, tokenizer, rank)
    if sp is not None and hasattr(sp, "close"):
        sp.close()
    _barrier()


def start_profile(cfg: RunConfig, step: int, rank: int):
    """A running torch.profiler (CPU operators) when ``step`` (from 0) is ``train.profile_step`` on rank 0."""
    if rank != 0 or cfg.train.profile_step != step + 1:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    profiler.start()
    return profiler


def write_profile(profiler, path: Path, elapsed: float, rows: int = 40) -> None:
    """Stop ``profiler`` and write its operator tables (by self time, then by total time) atomically to ``path``,
    and every operator's ``{name, calls, self_s, total_s}`` to the ``.json`` beside it.

    Self time adds up to the step's time on the main thread; total time counts nested operators again (and
    under activation checkpointing a layer's recomputed forward runs inside its first backward operator)."""
    profiler.stop()
    averages = profiler.key_averages()
    ops = sorted(({"name": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                   "total_s": e.cpu_time_total / 1e6} for e in averages), key=lambda o: -o["self_s"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step_s": elapsed, "ops": ops}, indent=1))
    tmp.replace(path.with_suffix(".json"))
    text = (f"torch.profiler, one optimizer step ({elapsed:.1f} s wall), rank 0, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads\n\nby self CPU time\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)
            + "\n\nby total CPU time (nested operators counted again)\n"
            + averages.table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=70) + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_adapter(engine, cfg: RunConfig, rank: int) -> None:
    """peft adapter files at <output_dir>/adapter; only the trainable (adapter) parameters are gathered."""
    import deepspeed

    peft_model = engine.module.model
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        state = {k: v.detach().clone().cpu() for k, v in peft_model.state_dict().items()
                 if "lora_" in k or "modules_to_save" in k} if rank == 0 else None
    if rank == 0:
        peft_model.save_pretrained(str(Path(cfg.output_dir) / "adapter"), state_dict=state)


def export(engine, cfg: RunConfig, hf_config, schedule, tokenizer, rank: int) -> None:
    """Merged plain-transformers model at <output_dir>/merged, written by rank 0.

    ZeRO-3 partitions are gathered one module at a time and kept on rank 0 only (the merged model is the one
    full copy); the other ranks never hold more than one module.
    """
    from .lora import export_merged
    from .parallel.zero import gathered_state_dict

    state = gathered_state_dict(engine.module.model, rank)
    if rank != 0:
        return
    model = build_model(cfg)
    if schedule is not None:
        alpha = cfg.positions.inference_alpha or schedule.alpha(cfg.train.max_steps - 1)
        set_inference_positions(model, model.config, alpha=alpha, cycle_length=cfg.positions.cycle_length)
    if cfg.lora.enabled:
        from .lora import apply_reduced_lora

        model = apply_reduced_lora(model, cfg.lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"export: state dict mismatch (missing {missing[:4]}, unexpected {unexpected[:4]})")
    export_merged(model, Path(cfg.output_dir) / "merged", tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    """Parse, train, and exit the process (os._exit) once distributed was initialised. Returns 2 on bad config."""
    from .logs import USER_ERRORS, captured_stdout, is_verbose, pop_verbose, setup_logging, user_error

    argv, verbose = pop_verbose(sys.argv[1:] if argv is None else list(argv))
    setup_logging(verbose or None)  # quiet libraries, one rank speaking; --verbose / DS_MSATTN_VERBOSE=1: all
    if any(a in ("-h", "--help") for a in argv):
        print("usage: ds-msattn train --config FILE [--section.key=VALUE ...] [--resume=auto|none|DIR]\n")
        print(__doc__)
        print("Sections and keys (defaults and docs): ds_msattn/config.py; recipes: ds_configs/recipes/.")
        return 0
    try:
        config_path, local_rank, overrides = split_argv(argv)
        cfg = load_config(config_path, overrides)
    except ValueError as err:
        print(f"ds-msattn train: error: {err}", file=sys.stderr)
        return 2
    default_distributed_env(local_rank)
    from .parallel.exit import exit_rank

    with captured_stdout():
        init_distributed(cfg)
    code = 0
    try:
        train(cfg)
    except USER_ERRORS as err:  # a user's mistake: one line (the traceback with --verbose)
        if is_verbose():
            traceback.print_exc()
        print(user_error("ds-msattn train", err), file=sys.stderr)
        code = 2
    except BaseException:  # noqa: BLE001 - report, then exit through the clean path below
        traceback.print_exc()
        code = 1
    finally:
        exit_rank(code)


if __name__ == "__main__":
    sys.exit(main())
