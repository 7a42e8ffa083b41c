"""Planner prediction vs measured peak memory of real CPU training steps, and the README's planner tables.

Usage: ``python benchmarks/planner_check.py [--quick]``. Writes ``benchmarks/results/planner_check.csv`` and
``.md`` (predicted vs measured, CPU) and ``benchmarks/results/planner_tables.md`` (GPU plans for the README).
Each measurement runs in a fresh process (see ``ds_msattn/planner_measure.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from ds_msattn.planner import GIB, PlanConfig, check_fit, plan_one
from ds_msattn.planner_measure import MS, TINY
from ds_msattn.planner_presets import shape_from_config

RESULTS = Path(__file__).resolve().parent / "results"
# SmolLM2-135M's shape (random init: memory does not depend on the weights' values).
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=65536,
    tie_word_embeddings=True,
)
SMOLLM2_MS = {"region_size": 16, "top_k": 64, "merge": 16, "sink_regions": 1}


def measure_in_subprocess(specs: list[dict], timeout: float = 3600):
    """Run :func:`ds_msattn.planner_measure.measure` for each spec in one fresh interpreter; yields results
    as they arrive (one JSON line per spec)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ds_msattn.planner_measure", "--json", json.dumps(specs)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                yield json.loads(line)
        if proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"measurement process failed with exit code {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()


def predict(config: dict, seq_len: int, attn: str, checkpointing: bool, ms: dict | None = None,
            deepspeed: str | None = None) -> float:
    """The planner's increment (bytes) for the CPU setting of :func:`measure_in_subprocess`."""
    ms = ms or MS
    zero, offload = (3, "cpu") if deepspeed else (0, "none")
    cfg = PlanConfig(
        model=shape_from_config(config, name="tiny"),
        seq_len=seq_len,
        lora=False,
        dtype="fp32",
        zero=zero,
        offload=offload,
        device="cpu",
        loss_chunk=0,  # the measured step uses transformers' own (unchunked) loss
        checkpointing=checkpointing,
        attn=attn,
        region_size=ms["region_size"],
        top_k=ms["top_k"],
        merge=ms["merge"],
    )
    return plan_one(cfg, zero, offload, 1).increment_gib * GIB


def cases(quick: bool, deepspeed: bool = False) -> list[dict]:
    if deepspeed:  # a real DeepSpeed ZeRO-3 engine with CPU parameter + optimizer offload (fp32)
        return [
            dict(name="tiny-llama-4L, ZeRO-3 offload", config=TINY, seq_len=T, attn=attn, checkpointing=ckpt,
                 ms_attention=MS, deepspeed="zero3_offload_cpu.json")
            for attn, T, ckpt in (("ms_attention", 1024, True), ("ms_attention", 4096, False), ("sdpa", 4096, True))
        ]
    lengths = (1024, 4096)
    out = []
    for attn in ("sdpa", "ms_attention"):
        for T in lengths:
            for ckpt in (False, True):
                out.append(dict(name="tiny-llama-4L", config=TINY, seq_len=T, attn=attn, checkpointing=ckpt, ms_attention=MS))
    for attn in ("sdpa", "ms_attention"):
        for T, ckpt in ((1024, False), (1024, True), (2048, True)) if not quick else ():
            out.append(dict(name="smollm2-135m", config=SMOLLM2, seq_len=T, attn=attn, checkpointing=ckpt, ms_attention=SMOLLM2_MS))
    return out


FIELDS = ["model", "attn", "seq_len", "checkpointing", "predicted_mib", "measured_mib", "error_pct"]


def check(quick: bool, deepspeed: bool = False) -> list[dict]:
    """Measure every case (rows appended to the CSV as they arrive) and compare."""
    rows = []
    specs = cases(quick, deepspeed)
    with open(RESULTS / f"planner_check{'_deepspeed' if deepspeed else ''}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for spec, got in zip(specs, measure_in_subprocess(specs)):
            pred = predict(spec["config"], spec["seq_len"], spec["attn"], spec["checkpointing"], spec["ms_attention"],
                           spec.get("deepspeed"))
            row = dict(
                model=spec["name"],
                attn=spec["attn"],
                seq_len=spec["seq_len"],
                checkpointing="on" if spec["checkpointing"] else "off",
                predicted_mib=round(pred / 2**20, 1),
                measured_mib=round(got["increment_bytes"] / 2**20, 1),
            )
            row["error_pct"] = round(100 * (row["predicted_mib"] / row["measured_mib"] - 1), 1)
            print(row, flush=True)
            writer.writerow(row)
            f.flush()
            rows.append(row)
    return rows


def gpu_tables() -> str:
    lines = []

    def row(cfg: PlanConfig) -> str:
        p = check_fit(cfg)
        b = p.breakdown_gib
        states = b["parameters"] + b["gradients"] + b["optimizer_states"]
        return (
            f"| {cfg.seq_len // 1024}K | {cfg.gpus * cfg.nodes} x {cfg.gpu_mem_gib:g} GB | {cfg.attn} | "
            f"{'on' if cfg.checkpointing else 'off'} | {cfg.loss_chunk or '-'} | {p.ds_config} | "
            f"{p.sequence_parallel_size} | {states:.1f} | {b['activations']:.1f} | {b['logits_and_loss']:.1f} | "
            f"{b['attention_workspace']:.1f} | {p.per_gpu_gib:.1f} | {p.host_gib:.1f} | {'yes' if p.fits else 'no'} |"
        ).replace(f"| {p.ds_config} |", f"| {p.ds_config if p.fits or cfg.zero else '(none fits; last tried ' + str(p.ds_config) + ')'}{' (searched)' if cfg.zero is None else ''} |", 1
        )

    head = (
        "| length | GPUs | attention | ckpt | loss chunk | ds_config | SP | model states | activations | logits | "
        "attn workspace | per GPU GiB | host GiB/node | fits |\n|" + " --- |" * 14
    )
    lines += ["### Llama2-7B, LoRA, bf16, one GPU", "", head]
    for mem in (40.0, 24.0):
        # the paper's setting (ZeRO-3 with CPU offload) with variations, then the planner's own choice
        for attn, ckpt, chunk, zero, offload in (
            ("ms_attention", True, 2048, 3, "cpu"),
            ("ms_attention", True, 0, 3, "cpu"),
            ("ms_attention", False, 2048, 3, "cpu"),
            ("sdpa", True, 2048, 3, "cpu"),
            ("eager", True, 2048, 3, "cpu"),
            ("ms_attention", True, 2048, None, None),
        ):
            cfg = PlanConfig("llama2-7b", 32768, gpus=1, gpu_mem_gib=mem, attn=attn, checkpointing=ckpt,
                             loss_chunk=chunk, zero=zero, offload=offload)
            lines.append(row(cfg))
    lines += ["", "### Llama2-7B, LoRA, bf16, sequence parallel (8 GPUs per node, 80 GB)", "", head]
    for T, gpus in ((131072, 8), (262144, 8), (524288, 16), (1048576, 32), (1048576, 64)):
        for attn in ("ms_attention", "sdpa"):
            cfg = PlanConfig(
                "llama2-7b", T, gpus=8, nodes=gpus // 8, gpu_mem_gib=80.0, attn=attn, checkpointing=True, loss_chunk=2048
            )
            lines.append(row(cfg))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--deepspeed", action="store_true", help="only the DeepSpeed ZeRO-3 offload cases")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tables = gpu_tables()
    (RESULTS / "planner_tables.md").write_text(tables)
    print(tables)
    if args.tables_only:
        return 0
    rows = check(args.quick, args.deepspeed)
    md = ["| model | attention | T | checkpointing | predicted MiB | measured MiB | error % |", "|" + " --- |" * 7]
    md += [
        f"| {r['model']} | {r['attn']} | {r['seq_len']} | {r['checkpointing']} | {r['predicted_mib']} | "
        f"{r['measured_mib']} | {r['error_pct']:+} |"
        for r in rows
    ]
    (RESULTS / f"planner_check{'_deepspeed' if args.deepspeed else ''}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
