"""Recursive (streaming) mode on the real model: perplexity and passkey against full MS attention.

The committed results (eval_recursive_smollm2.md) were measured with the earlier summary-state runner (region
means beyond the window, before commit f3a1bdf); the variants below are those of the streaming runner that
replaced it (benchmarks/eval_streaming.py measures it to 1M tokens).

SmolLM2-135M, CRD-NTK inference (alpha 4, base for the evaluated length), MS c=16 K=64 m=16 s=1:
- perplexity of the first ``--context`` tokens of the longest works: full ``ms_attention`` (one forward) vs
  the runner with (a) a window holding everything (must match full), (b) a 64-region window plus the exact
  store searched through summaries at scales 1, 16, 256 (beam 32);
- passkey through the recursive runner (prefill in chunks, greedy decoding from the state) at lengths
  beyond what a full forward would hold.
Writes ``benchmarks/results/eval_recursive_smollm2.md`` and ``.json``.

    python benchmarks/eval_recursive_smollm2.py [--device cuda] [--context 32768] [--docs 2]
        [--passkey-lengths 32768,131072] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

MS = dict(region_size=16, top_k=64, merge=16, sink_regions=1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--passkey-lengths", default="32768,131072")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results"))
    a = ap.parse_args()
    from ds_msattn.corpora import corpus_texts
    from ds_msattn.eval.loading import EvalModelSpec, load_eval_model, prepare_length
    from ds_msattn.eval.passkey import make_passkey_prompt, passkey_keys, score
    from ds_msattn.eval.ppl import tokenize_documents, window_nll
    from ds_msattn.eval.recursive import RecursiveConfig, RecursiveRunner
    from ds_msattn.models import load_tokenizer

    spec = EvalModelSpec(model="smollm2", attention="ms_attention", ms_params={**MS, "backend": "torch"}, rope="crd-ntk",
                         rope_factor=4.0)
    tok = load_tokenizer("smollm2")
    model = load_eval_model(spec, device=a.device)
    docs = tokenize_documents(tok, corpus_texts("shakespeare"), min_tokens=a.context, enough=(a.context, a.docs))[: a.docs]
    variants = {
        "recursive, window holds everything": dict(window_regions=10**9),
        "streaming, window 64 regions, summary scales 1,16,256, beam 32": dict(window_regions=64),
    }
    prepare_length(model, spec, a.context)
    rows = []
    full_nll, full_n, t0 = 0.0, 0, time.perf_counter()
    for _, ids in docs:
        nll, n = window_nll(model, ids[: a.context], 1)
        full_nll, full_n = full_nll + nll, full_n + n
    rows.append(dict(setup="full ms_attention (one forward)", ppl=math.exp(full_nll / full_n), tokens=full_n,
                     seconds=round(time.perf_counter() - t0, 1), state_elements=None))
    print(rows[-1], flush=True)
    for label, extra in variants.items():
        cfg = RecursiveConfig(**MS, chunk=1024, **{"scales": (1, 16, 256), "beam": 32, **extra})
        runner = RecursiveRunner(model, cfg)
        tot, cnt, t0, state = 0.0, 0, time.perf_counter(), 0
        for _, ids in docs:
            res = runner.run(ids[: a.context], log=None)
            tot, cnt, state = tot + res["nll_per_token"] * res["scored_tokens"], cnt + res["scored_tokens"], res["state_elements"]
        rows.append(dict(setup=label, ppl=math.exp(tot / cnt), tokens=cnt, seconds=round(time.perf_counter() - t0, 1),
                         state_elements=state))
        print(rows[-1], flush=True)
    passkey = []
    cfg = RecursiveConfig(**MS, chunk=1024, window_regions=64, scales=(1, 16, 256), beam=32)
    for length in [int(x) for x in a.passkey_lengths.split(",")]:
        prepare_length(model, spec, length)
        runner = RecursiveRunner(model, cfg)
        import random

        rng = random.Random(f"0-{length}")
        for trial, key in enumerate(passkey_keys(length, a.trials)):
            depth = rng.random()
            prompt = make_passkey_prompt(tok, length, key, depth)
            t0 = time.perf_counter()
            res = runner.run(torch.tensor(prompt.input_ids), new_tokens=8, log=None)
            text = tok.decode(res["new_tokens"])
            passkey.append(dict(length=length, depth=round(depth, 4), key=key, generated=text, passed=score(text, key),
                                seconds=round(time.perf_counter() - t0, 1), state_elements=res["state_elements"]))
            print(passkey[-1], flush=True)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    import transformers

    lines = ["# Recursive mode on SmolLM2-135M (no fine-tuning)", "",
             f"Measured on {device} (torch {torch.__version__}, transformers {transformers.__version__}), fp32. "
             f"MS c=16 K=64 m=16 s=1, CRD-NTK inference alpha 4 (base for the evaluated length), chunk 1024.",
             f"Perplexity: first {a.context} tokens of each of the {len(docs)} longest Shakespeare works "
             f"({', '.join(n for n, _ in docs)}).", "",
             "| set-up | ppl | scored tokens | state elements (all layers) | seconds |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['setup']} | {r['ppl']:.3f} | {r['tokens']} | {r['state_elements'] or '-'} | {r['seconds']} |" for r in rows]
    lines += ["", "Passkey through the streaming runner (window 64 regions, summary scales 1,16,256, beam 32), random depth, seed 0:", "",
              "| length | passed | outputs |", "| --- | --- | --- |"]
    for length in sorted({p["length"] for p in passkey}):
        ps = [p for p in passkey if p["length"] == length]
        lines.append(f"| {length} | {sum(p['passed'] for p in ps)}/{len(ps)} | "
                     + "; ".join(f"key {p['key']} depth {p['depth']}: {p['generated']!r}" for p in ps) + " |")
    lines += ["", f"Command: `python benchmarks/eval_recursive_smollm2.py {' '.join(sys.argv[1:])}`", ""]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_recursive_smollm2.md").write_text("\n".join(lines))
    (out / "eval_recursive_smollm2.json").write_text(json.dumps(dict(ppl=rows, passkey=passkey), indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
