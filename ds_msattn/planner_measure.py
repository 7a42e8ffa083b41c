"""Measure what the planner predicts on the CPU device: the peak-RSS increase of one training step.

Run in a fresh process (``python -m ds_msattn.planner_measure --json '[{...}, ...]'``) with
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment, so that freed tensors go back to the OS and the resident
set tracks live tensors (glibc otherwise keeps freed heap memory resident and its threshold drifts).

The step: a random-init transformers Llama (fp32) is built and warmed up with one short forward + backward
(lazy kernels and caches); then the current RSS is the baseline, the peak-RSS mark is reset
(``/proc/self/clear_refs``), one forward + backward + AdamW step runs at the measured length, and the peak
minus the baseline is the measured increment. Several specs may share a process (each builds its own model;
the previous one is freed first). The planner's matching prediction is ``Plan.increment_gib`` for
``PlanConfig(device="cpu", zero=0, dtype="fp32", lora=False)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

# The tiny Llama and MS setting that the planner tests and benchmarks measure.
TINY = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=65536,
    tie_word_embeddings=False,
)
MS = {"region_size": 16, "top_k": 8, "merge": 4, "sink_regions": 1}

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _deepspeed_engine(model, optimizer, ds_config: str):
    """``deepspeed.initialize`` with ``ds_configs/<ds_config>`` in a world of one process (gloo on CPU)."""
    import socket
    from pathlib import Path

    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / ds_config).read_text())
    config["train_micro_batch_size_per_gpu"] = 1
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def measure(spec: dict) -> dict:
    """One measured step. ``spec``: ``config`` (LlamaConfig kwargs), ``seq_len``, ``attn``, ``checkpointing``,
    optional ``ms_attention`` (dict), ``batch`` (1), ``threads`` (1), ``seed`` (0)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_msattn  # noqa: F401  (registers "ms_attention")

    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(int(spec.get("seed", 0)))
    config = LlamaConfig(**spec["config"])
    if spec.get("ms_attention"):
        config.ms_attention = dict(spec["ms_attention"])
    model = LlamaForCausalLM._from_config(config, attn_implementation=spec["attn"], dtype=torch.float32)
    model.train()
    if spec["checkpointing"]:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    B, T, V = int(spec.get("batch", 1)), int(spec["seq_len"]), config.vocab_size
    engine = None
    if spec.get("deepspeed"):  # a ds_configs/ file: ZeRO through a real DeepSpeed engine (single process)
        engine = _deepspeed_engine(model, optimizer, spec["deepspeed"])

    def step(n: int, update: bool) -> float:
        ids = torch.randint(0, V, (B, n))
        if engine is not None:
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            loss = float(out.loss)
            del out
            engine.step()  # DeepSpeed steps and clears gradients in one call
            return loss
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        loss = float(out.loss)
        del out
        if update:
            optimizer.step()
        return loss

    # Warm-up with a full step: kernels, thread pools, rotary caches, and AdamW's moments, which persist in
    # training (steady state); gradients are then dropped, as zero_grad does between steps.
    step(min(T, 256), update=True)
    model.zero_grad(set_to_none=True)
    gc.collect()
    baseline = _rss_bytes()
    _reset_peak()
    loss = step(T, update=True)
    peak = _peak_bytes()
    del model, optimizer, engine
    gc.collect()
    return {"baseline_bytes": baseline, "peak_bytes": peak, "increment_bytes": peak - baseline, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="a measurement spec, or a list of them, as JSON")
    args = p.parse_args(argv)
    specs = json.loads(args.json)
    for spec in specs if isinstance(specs, list) else [specs]:
        print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
