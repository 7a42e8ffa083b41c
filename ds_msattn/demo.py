"""MS attention against dense attention on the real model (SmolLM2-135M) and real text (Hamlet).

``ds-msattn demo`` prints perplexity on non-overlapping windows for dense attention and several MS settings
(the table of the README), with wall time per setting. No fine-tuning: it shows what the selection rule costs
out of the box and how the sink region recovers most of it.
"""

from __future__ import annotations

import json
import math
import time

import torch

#: The paper's rule (exact positions, rope scores: the options' first values), stated so that the table does not
#: follow the package's model defaults.
PAPER_RULE = {"far_positions": "exact", "score": "rope", "select_per": "head"}
#: (label, ms_attention parameters or None for dense sdpa)
SETTINGS = [
    ("dense (sdpa)", None),
    ("c=16 K=128 m=16, no sink", {"region_size": 16, "top_k": 128, "merge": 16, "sink_regions": 0, **PAPER_RULE}),
    ("c=16 K=64 m=16, no sink", {"region_size": 16, "top_k": 64, "merge": 16, "sink_regions": 0, **PAPER_RULE}),
    ("c=16 K=16 m=4, no sink", {"region_size": 16, "top_k": 16, "merge": 4, "sink_regions": 0, **PAPER_RULE}),
    ("c=16 K=64 m=16, sink 1", {"region_size": 16, "top_k": 64, "merge": 16, "sink_regions": 1, **PAPER_RULE}),
    ("c=16 K=16 m=4, sink 1", {"region_size": 16, "top_k": 16, "merge": 4, "sink_regions": 1, **PAPER_RULE}),
]


def keys_per_query(params: dict | None, window: int) -> int:
    return window if params is None else params["top_k"] * params["region_size"]


def text_windows(tokenizer, text: str, window: int, count: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``window`` tokens -> ``[count, window]``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < window * count:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than window*count = {window * count}")
    return ids[: window * count].view(count, window)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, params: dict | None) -> float:
    """Mean next-token negative log-likelihood over all windows, with ``params`` as the attention."""
    if params is None:
        model.set_attn_implementation("sdpa")
    else:
        model.config.ms_attention = dict(params)
        model.set_attn_implementation("ms_attention")
    total, count = 0.0, 0
    for row in windows:
        logits = model(row[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
    return total / count


def run(model_name: str, work: str, window: int, windows: int, settings=SETTINGS) -> list[dict]:
    from .corpora import corpus_texts
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name).eval()
    data = text_windows(tokenizer, corpus_texts("shakespeare")[work], window, windows)
    rows = []
    dense = None
    for label, params in settings:
        start = time.perf_counter()
        ppl = math.exp(window_nll(model, data, params))
        seconds = time.perf_counter() - start
        dense = ppl if params is None else dense
        rows.append(
            {
                "attention": label,
                "keys_per_query": keys_per_query(params, window),
                "ppl": round(ppl, 2),
                "vs_dense": None if dense is None or params is None else round(ppl / dense - 1, 4),
                "seconds": round(seconds, 1),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| attention | keys per query | ppl | vs dense | time |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        vs = "-" if r["vs_dense"] is None else f"{r['vs_dense']:+.0%}"
        lines.append(f"| {r['attention']} | {r['keys_per_query']} | {r['ppl']:.1f} | {vs} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .logs import OneLineArgumentParser  # errors as one line, exit code 2

    parser = OneLineArgumentParser(prog="ds-msattn demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="alias or model directory (default smollm2)")
    parser.add_argument("--work", default="hamlet", help="work of the built-in Shakespeare corpus")
    parser.add_argument("--window", type=int, default=4096, help="tokens per window")
    parser.add_argument("--windows", type=int, default=2, help="number of windows")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.window < 2 or args.windows < 1:
        parser.error("--window must be >= 2 and --windows >= 1")
    torch.manual_seed(0)
    rows = run(args.model, args.work, args.window, args.windows)
    print(f"{args.model} on {args.windows} x {args.window}-token windows of {args.work} (no fine-tuning):\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
