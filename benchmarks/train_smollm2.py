"""SmolLM2-135M fine-tuning at 16K on CPU: step time and peak memory, MS attention vs dense (sdpa), same run.

Each attention implementation runs the real pipeline (ds_configs/recipes/smollm2_16k.yaml: CRD-NTK, reduced
LoRA, ZeRO-3 offload, activation checkpointing) for a few optimizer steps in its own process, one after the
other on the same machine; step times and the process's peak resident memory come from its metrics.jsonl.

    python benchmarks/train_smollm2.py [--steps 2] [--seq-len 16384] [--ranks 1]

Writes benchmarks/results/train_smollm2.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "ds_configs" / "recipes" / "smollm2_16k.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(impl: str, steps: int, seq_len: int, ranks: int, work: Path) -> list[dict]:
    out = work / impl
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"--output_dir={out}", f"--attention.implementation={impl}", f"--train.max_steps={steps}",
                 f"--data.seq_len={seq_len}", "--resume=none", "--checkpoint.interval=0",
                 "--checkpoint.save_final=false", "--checkpoint.export_merged=false", "--tensorboard=false"]
    bin_dir = Path(sys.executable).parent
    if ranks == 1:
        cmd = [sys.executable, "-m", "ds_msattn.train", "--config", str(RECIPE), *overrides]
    else:
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(_port()), "--module",
               "ds_msattn.train", "--config", str(RECIPE), *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0, load0 = time.time(), os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{impl} run failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["attention"] = impl
        r["process_wall_s"] = time.time() - t0
        r["load_before"], r["load_after"] = round(load0, 2), round(os.getloadavg()[0], 2)
    return rows


def _recipe_attention() -> str:
    import yaml

    att = yaml.safe_load(RECIPE.read_text())["attention"]
    return ", ".join(f"{k}={v}" for k, v in att.items() if k != "implementation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--impls", default="ms_attention,sdpa")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = RESULTS / "train_smollm2_runs"
    rows = []
    for impl in args.impls.split(","):
        rows += run_one(impl, args.steps, args.seq_len, args.ranks, work)
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)

    fields = ["attention", "step", "step_time_s", "tokens_per_s", "peak_memory_mib", "loss", "alpha", "load_before", "load_after"]
    with open(RESULTS / "train_smollm2.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# SmolLM2-135M fine-tuning step at 16K tokens on CPU: MS attention vs dense (sdpa)",
        "",
        f"Measured by `benchmarks/train_smollm2.py --steps {args.steps} --seq-len {args.seq_len} --ranks {args.ranks}`"
        f" on {platform.machine()} with {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Pipeline of `ds_configs/recipes/smollm2_16k.yaml` (CRD-NTK, reduced LoRA, ZeRO-3 offload, fp32, activation"
        f" checkpointing), {args.ranks} rank(s), micro batch 1; MS attention as the recipe sets it: {_recipe_attention()}.",
        "Peak memory: the training process's peak resident set (ru_maxrss, model load and data included).",
        "Step 1 includes one-time warm-up (ZeRO-3 tracing); later steps are steady state. The CPU may be shared with",
        "other jobs, so compare the two rows of the same step rather than absolute numbers; the 1-minute load average",
        "before and after each run says how busy it was (2 cores: about 2 is this job alone).",
        "",
        "| attention | step | step time (s) | tokens/s | peak RSS (MiB) | loss | load before / after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['attention']} | {r['step']} | {r['step_time_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_memory_mib']:.0f} | {r['loss']:.4f} | {r['load_before']} / {r['load_after']} |")
    (RESULTS / "train_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
