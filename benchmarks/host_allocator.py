"""Training step time and peak host memory against glibc's mmap threshold (``train.host_mmap_threshold_mib``).

    python benchmarks/host_allocator.py [--impls s2_attention,ms_attention] [--thresholds 32,4,1] [--seq-len 8192]

Each (attention, threshold) runs in a fresh process: the first ``--layers`` layers of SmolLM2-135M (fp32, gradient
checkpointing as the trainer uses it), the threshold set the way the trainer sets it after loading
(``loading_allocator(False, threshold)``), then ``--reps`` forward+backward passes over one random sequence. The
peak is the highest RSS seen at any layer's forward or backward hook. Writes
``benchmarks/results/host_allocator.{json,md}`` (one JSON line per run, appended as it finishes; a rerun skips
the runs already there).

Heavy: about a minute per run on 2 cores; run it alone (``/work/shared/bin/heavy``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "host_allocator.json"


def one_run(impl: str, seq_len: int, layers: int, threshold: int, reps: int) -> dict:
    import psutil
    import torch

    import ds_msattn.hf  # noqa: F401  (registers the attention implementations)
    from ds_msattn.models import load_model
    from ds_msattn.parallel.zero import loading_allocator

    torch.manual_seed(0)
    model = load_model("smollm2", attn_implementation=impl, num_hidden_layers=layers)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loading_allocator(False, threshold)
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]

    def sample(*_):
        peak[0] = max(peak[0], proc.memory_info().rss)

    for layer in model.model.layers:
        layer.register_forward_hook(sample)
        layer.register_full_backward_hook(sample)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        seconds.append(round(time.perf_counter() - start, 2))
    return {"impl": impl, "seq_len": seq_len, "layers": layers, "threshold_mib": threshold, "seconds": seconds,
            "rss_before_mib": round(before / 2**20), "peak_rss_mib": round(peak[0] / 2**20)}


def report(runs: list[dict], command: str) -> None:
    lines = ["# Host allocator: glibc mmap threshold vs step time and peak RSS (CPU)", "",
             "SmolLM2-135M, first layers only, fp32, gradient checkpointing, one sequence, 2 threads; seconds of each",
             "forward+backward (the first includes warm-up); peak: highest RSS at any layer hook. Written by",
             f"`{command}`.", "",
             "| attention | tokens | layers | threshold MiB | seconds per step | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['impl']} | {r['seq_len']} | {r['layers']} | {r['threshold_mib']} | "
                     f"{', '.join(map(str, r['seconds']))} | {r['peak_rss_mib']} |")
    (RESULTS / "host_allocator.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", default="s2_attention,ms_attention")
    p.add_argument("--thresholds", default="32,4,1")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: impl,threshold in this process
    args = p.parse_args(argv)
    if args.one:
        impl, threshold = args.one.split(",")
        print(json.dumps(one_run(impl, args.seq_len, args.layers, int(threshold), args.reps)), flush=True)
        return 0
    runs = [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.exists() else []
    done = {(r["impl"], r["seq_len"], r["layers"], r["threshold_mib"]) for r in runs}
    for impl in args.impls.split(","):
        for threshold in map(int, args.thresholds.split(",")):
            if (impl, args.seq_len, args.layers, threshold) in done:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", f"{impl},{threshold}", "--seq-len",
                                  str(args.seq_len), "--layers", str(args.layers), "--reps", str(args.reps)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs.append(json.loads(out))
            with OUT.open("a") as f:
                f.write(out + "\n")
            print(out, flush=True)
    report(runs, "python benchmarks/host_allocator.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
