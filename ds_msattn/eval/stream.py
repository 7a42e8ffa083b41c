"""``ds-msattn eval stream``: the streaming runner (:mod:`ds_msattn.eval.recursive`) from the command line.

Either a text (``--text-file`` / ``--corpus``: works joined by blank lines, streamed in chunks) whose NLL is
reported overall and per ``--segment-tokens`` segment, then a greedy continuation; or passkey prompts
(``--passkey-lengths``), each streamed chunk by chunk (the prompt of ``make_passkey_prompt``, never held whole).
Reports prefill tokens/s, the store's size on disk and peak RSS.
"""

from __future__ import annotations

import random
import resource
import time

import numpy as np
import torch

from .passkey import FILLER, KEY_SENTENCE, QUESTION, first_integer, passkey_keys, score
from .recursive import COARSE_SCORES, RecursiveConfig, RecursiveRunner
from .store import STORE_DTYPES


def add_stream_args(sub, model_args) -> None:
    """The ``stream`` subcommand (``recursive`` is the same command under its earlier name)."""
    st = sub.add_parser("stream", aliases=["recursive"],
                        help="streaming inference over an exact region store: NLL of a long input or passkey, any length")
    model_args(st)
    src = st.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", default=None)
    src.add_argument("--corpus", default=None, help="built-in corpus (works joined by blank lines)")
    src.add_argument("--passkey-lengths", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                     help="passkey prompts of these lengths, e.g. 32768,131072")
    st.add_argument("--trials", type=int, default=1, help="passkey trials per length (depths spread over [0, 1])")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--max-tokens", type=int, default=None, help="tokens of the text read")
    st.add_argument("--segment-tokens", type=int, default=32768, help="NLL per segment of this many tokens")
    st.add_argument("--chunk", type=int, default=1024, help="tokens per chunk (multiple of merge*region_size)")
    st.add_argument("--window-regions", type=int, default=64, help="recent regions scored by their own summary")
    st.add_argument("--local-regions", type=int, default=16,
                    help="recent regions always attended, out of the top_k - merge budget (0: the paper's rule)")
    st.add_argument("--scales", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=(1, 16, 256),
                    help="regions per summary at each level, 1 first, e.g. 1,16,256")
    st.add_argument("--beam", "--summary-slots", dest="beam", type=int, default=32,
                    help="summaries kept per coarse level")
    st.add_argument("--coarse-score", default="bound", choices=list(COARSE_SCORES),
                    help="coarse groups scored by an upper bound of their regions' scores (default) or by their mean")
    st.add_argument("--store-dtype", default=None, choices=sorted(STORE_DTYPES),
                    help="dtype of the stored k and v (default: the model's)")
    st.add_argument("--store-memory-gib", type=float, default=4.0, help="host memory of the store before disk")
    st.add_argument("--store-dir", default=None, help="directory for the store's files (default: the temp dir)")
    st.add_argument("--keep-store", action="store_true", help="leave the store's files in place")
    st.add_argument("--new-tokens", type=int, default=16)


def passkey_chunks(tokenizer, length: int, key: int, depth: float, chunk: int):
    """The prompt of :func:`~ds_msattn.eval.passkey.make_passkey_prompt` (the same ids) as int64 chunks."""
    enc = lambda s: np.array(tokenizer(s, add_special_tokens=False)["input_ids"], dtype=np.int64)  # noqa: E731
    filler, key_ids, question = enc(FILLER), enc(KEY_SENTENCE.format(key=key)), enc(QUESTION)
    budget = length - len(key_ids) - len(question)
    if budget < 0:
        raise ValueError(f"length must be at least {len(key_ids) + len(question)} tokens for the key and question, got {length}")
    units = budget // len(filler)
    cut = min(round(depth * units) * len(filler), budget)
    buf = np.empty(0, dtype=np.int64)
    for a, n, ids in ((0, cut, None), (0, 0, key_ids), (cut, budget - cut, None), (0, 0, question)):
        while n > 0 or ids is not None:
            if ids is None:
                take = min(n, chunk)
                piece = filler[np.arange(a, a + take) % len(filler)]
                a, n = a + take, n - take
            else:
                piece, ids = ids, None
            buf = np.concatenate([buf, piece])
            while buf.shape[0] >= chunk:
                yield torch.from_numpy(buf[:chunk].copy())
                buf = buf[chunk:]
    if buf.shape[0]:
        yield torch.from_numpy(buf.copy())


def spread_depths(seed: int, length: int, trials: int) -> list[float]:
    """Trial i of n at a random depth in ``[i/n, (i+1)/n)`` (seeded by seed and length)."""
    rng = random.Random(f"{seed}-{length}")
    return [(i + rng.random()) / trials for i in range(trials)]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def joined_ids(tokenizer, texts: dict[str, str], max_tokens: int | None) -> tuple[torch.Tensor, list[dict]]:
    """Texts in order, each after a blank line, tokenized and joined (at most ``max_tokens``) -> (ids, the works
    used: ``{"name", "start"}`` with the token offset where each begins)."""
    parts, works, total = [], [], 0
    for name, text in texts.items():
        ids = tokenizer("\n\n" + text, add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.int32))
        works.append(dict(name=name, start=total))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return torch.cat(parts)[:max_tokens].long(), works


def run_stream(args, model, tokenizer, spec, texts, log) -> dict:
    """The ``stream`` task -> report fields (config, results; passkey trials or NLL per segment)."""
    from .loading import prepare_length

    cfg = RecursiveConfig(**spec.ms_params, chunk=args.chunk, window_regions=args.window_regions,
                          local_regions=args.local_regions, scales=tuple(args.scales), beam=args.beam,
                          coarse_score=args.coarse_score,
                          store_dtype=args.store_dtype, store_memory_gib=args.store_memory_gib,
                          store_dir=args.store_dir, keep_store=args.keep_store)
    runner = RecursiveRunner(model, cfg)
    out = {"stream": cfg.describe()}
    try:
        if args.passkey_lengths:
            trials = []
            for length in args.passkey_lengths:
                prepare_length(model, spec, length)  # CRD-NTK: the base for this length (read by each run)
                keys = passkey_keys(args.seed * 1_000_003 + length, args.trials)
                for trial, (depth, key) in enumerate(zip(spread_depths(args.seed, length, args.trials), keys)):
                    t0 = time.perf_counter()
                    res = runner.run(passkey_chunks(tokenizer, length, key, depth, cfg.chunk), new_tokens=8, log=None,
                                     score=False, planned_tokens=length + 8)
                    text = tokenizer.decode(res["new_tokens"])
                    trials.append(dict(length=length, trial=trial, depth=round(depth, 4), key=key, generated=text,
                                       found=first_integer(text), passed=score(text, key),
                                       prefill_tokens_per_s=res["prefill_tokens_per_s"],
                                       store_disk_gib=round(res["store_bytes"]["disk"] / 2**30, 3),
                                       peak_rss_mib=round(_peak_rss_mib(), 1), seconds=round(time.perf_counter() - t0, 1)))
                    log(f"stream passkey L={length} depth={trials[-1]['depth']} key={key} -> {text!r} "
                        f"{'PASS' if trials[-1]['passed'] else 'fail'} ({res['prefill_tokens_per_s']} tokens/s)")
            out["passed"] = {str(L): f"{sum(t['passed'] for t in trials if t['length'] == L)}/{args.trials}"
                             for L in args.passkey_lengths}
            out["trials"] = trials
        else:
            ids, works = joined_ids(tokenizer, texts, args.max_tokens)
            prepare_length(model, spec, int(ids.shape[0]))
            res = runner.run(ids, new_tokens=args.new_tokens, log=log, segment_tokens=args.segment_tokens)
            res["continuation"] = tokenizer.decode(res["new_tokens"])
            out |= dict(documents=works, **res)
        out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    finally:
        runner.close()
    return out
