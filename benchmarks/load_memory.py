"""Per-rank peak host memory (RSS) while the trainer loads a model under ZeRO-3: full copies vs zero.Init.

    python benchmarks/load_memory.py [--ranks 2] [--layers 16] [--hidden 2048]

Each rank is a fresh process (RANK/WORLD_SIZE set, as under srun) that runs the trainer's own loading path on a
random-init Llama of about 1.1B parameters (Llama-3.2-1B's layer shape with a 32000-token vocabulary, untied
head: 16 layers, hidden 2048, MLP 8192, 32/8 heads), fp32, the tiny recipe's reduced LoRA and its ZeRO-3
parameter + optimizer offload config: `build_model` (with `parallel.zero_init` true or false), peft, and
`deepspeed.initialize`. It records the peak RSS (VmHWM) after each stage. Writes
``benchmarks/results/load_memory.{csv,md}`` with the planner's `load_host_gib` next to the measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "ds_configs" / "recipes" / "tiny.yaml"


def shape(layers: int, hidden: int) -> dict:
    return dict(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=4096,
                tie_word_embeddings=False)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rank_main(args) -> None:
    """One rank: the trainer's loading path, peak RSS after each stage -> JSON line on stdout."""
    import torch

    from ds_msattn.config import load_config
    from ds_msattn.train import TokenLossModel, build_model, deepspeed_config, default_distributed_env, init_distributed

    overrides = {"model": {"tiny": shape(args.layers, args.hidden)}, "parallel": {"zero_init": args.zero_init}}
    cfg = load_config(RECIPE, overrides)
    default_distributed_env()
    init_distributed(cfg)
    import deepspeed
    import torch.distributed as dist

    from ds_msattn.lora import apply_reduced_lora
    from ds_msattn.parallel.exit import exit_rank
    from ds_msattn.parallel.zero import loading_allocator, partitioned_loading, partitioned_peft_copies

    stages = {"start": peak_rss_mib()}
    t0 = time.perf_counter()
    ds_config = deepspeed_config(cfg)
    loading_allocator(True)
    model = build_model(cfg, ds_config)
    stages["model"] = peak_rss_mib()
    torch.manual_seed(cfg.model.init_seed + 1)
    with partitioned_loading(ds_config, cfg.parallel.zero_init), \
            partitioned_peft_copies(model, cfg.lora.modules_to_save):
        model = apply_reduced_lora(model, cfg.lora)
    stages["lora"] = peak_rss_mib()
    wrapper = TokenLossModel(model)
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=ds_config)
    loading_allocator(False)
    stages["engine"] = peak_rss_mib()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in wrapper.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in wrapper.parameters())
    record = {"rank": dist.get_rank(), "world": dist.get_world_size(), "zero_init": args.zero_init,
              "layers": args.layers, "hidden": args.hidden,
              "params": n_params, "local_params": local, "load_s": time.perf_counter() - t0,
              **{f"peak_{k}_mib": round(v, 1) for k, v in stages.items()}}
    print("RESULT " + json.dumps(record), flush=True)
    dist.barrier()
    exit_rank(0)


def launch(args, zero_init: bool) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(args.ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(args.ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--rank-main", f"--layers={args.layers}", f"--hidden={args.hidden}",
               f"--zero-init={int(zero_init)}"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    records = []
    for r, p in enumerate(procs):
        out, _ = p.communicate(timeout=3600)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"rank {r} failed ({p.returncode}):\n{out[-4000:]}")
        records.append(json.loads(lines[-1][len("RESULT "):]))
    return records


def planned(args, zero_init: bool) -> float:
    """The planner's per-rank host GiB at load for this setting (fp32, LoRA, ZeRO-3 CPU offload, CPU ranks)."""
    from ds_msattn.models import tiny_llama_config
    from ds_msattn.planner import PlanConfig, plan_one
    from ds_msattn.planner_presets import shape_from_config

    cfg = PlanConfig(model=shape_from_config(tiny_llama_config(**shape(args.layers, args.hidden))), seq_len=1024,
                     gpus=args.ranks, gpu_mem_gib=1000, lora=True, dtype="fp32", zero=3, offload="cpu",
                     device="cpu", zero_init=zero_init)
    return plan_one(cfg, 3, "cpu", 1).load_host_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-init", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="full,partitioned", help="full (parallel.zero_init false), partitioned")
    parser.add_argument("--out", default=str(RESULTS / "load_memory"))
    args = parser.parse_args()
    if args.rank_main:
        args.zero_init = bool(args.zero_init)
        rank_main(args)
        return
    rows = []
    for zero_init in [{"full": False, "partitioned": True}[m] for m in args.modes.split(",")]:
        records = launch(args, zero_init)
        plan = planned(args, zero_init)
        for rec in records:
            rec["planned_load_mib"] = round(plan * 1024, 1)
            rec["error"] = round(rec["planned_load_mib"] / rec["peak_engine_mib"] - 1, 4)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Peak RSS per rank while loading a random-init Llama of {rows[0]['params'] / 1e9:.2f}B parameters "
             f"(fp32, {args.layers} layers, hidden {args.hidden}) on {args.ranks} CPU ranks: build_model, reduced "
             "LoRA, deepspeed.initialize (ZeRO-3, parameter and optimizer offload to CPU). "
             "`python benchmarks/load_memory.py`.", "",
             "| loading | rank | parameters held | after build MiB | after peft MiB | after engine MiB | planner MiB "
             "| error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {'zero.Init (partitioned)' if r['zero_init'] else 'full copy per rank'} | {r['rank']} | "
                     f"{r['local_params'] / 1e6:.0f}M | {r['peak_model_mib']:.0f} | {r['peak_lora_mib']:.0f} | "
                     f"{r['peak_engine_mib']:.0f} | "
                     f"{r['planned_load_mib']:.0f} | {100 * r['error']:+.1f}% |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
