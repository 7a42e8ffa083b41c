"""``ds-msattn eval passkey|ppl|stream``: long-context evaluation from the command line.

Each subcommand writes a JSON file (``--output``) with the exact command, the model set-up and the
results, and a PNG beside it (same name, ``.png``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ds_msattn.attention.options import FAR_POSITIONS, MODEL_OPTIONS, SCORES, SELECT_PER
from ds_msattn.config import MODEL_DTYPES
from ds_msattn.logs import OneLineArgumentParser, run_command, say

from .loading import ROPE_MODES


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="alias (smollm2) or transformers model directory")
    p.add_argument("--adapter", default=None, help="peft adapter directory from training")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "ms_attention", "eager", "esa_attention"])
    p.add_argument("--region-size", type=int, default=16)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--merge", type=int, default=16)
    p.add_argument("--sink-regions", type=int, default=1)
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "triton", "reference"], help="ms_attention backend")
    p.add_argument("--far-positions", default=None, choices=list(FAR_POSITIONS),
                   help=f"where selected far keys sit for RoPE (default {MODEL_OPTIONS['far_positions']})")
    p.add_argument("--far-window", type=int, default=None, help="W of capped/grouped, tokens")
    p.add_argument("--far-group", type=int, default=None, help="G of grouped")
    p.add_argument("--score", default=None, choices=list(SCORES), help="region summaries: rope or position_free")
    p.add_argument("--select-per", default=None, choices=list(SELECT_PER), help="one selection per head or kv_group")
    p.add_argument("--rope", default="none", choices=list(ROPE_MODES))
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES),
                   help="model weights and activations (bfloat16: several times faster on CPUs with AMX)")
    p.add_argument("--rope-factor", type=float, default=4.0, help="NTK alpha for dynamic / crd-ntk")
    p.add_argument("--rope-length", type=int, default=None,
                   help="crd-ntk: fixed target length L of the base (default: each input's own length)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in fp32 either way)")
    p.add_argument("--output", required=True, help="JSON results file (a PNG is written beside it)")
    p.add_argument("--quiet", action="store_true", help="no per-window/per-trial lines (progress stays on stderr)")


def _kv_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", default="none", choices=["none", "h2o"],
                   help="KV-cache policy: none (keep everything) or h2o (heavy hitters + a recent window)")
    p.add_argument("--kv-budget", type=int, default=None,
                   help="h2o: tokens kept per layer and kv head (heavy hitters + recent)")
    p.add_argument("--recent", type=int, default=None,
                   help="h2o: most recent tokens always kept (default: half the budget)")
    p.add_argument("--kv-chunk", type=int, default=None,
                   help="h2o: tokens per step while reading the input (default 64; 1: H2O's per-token rule)")


#: ``--esa-*`` flag -> key of ``config.esa_attention`` (ds_msattn/hf_esa.py); unset flags take its defaults.
ESA_FLAGS = {"--esa-top-k": "top_k", "--esa-sink-tokens": "sink_tokens", "--esa-local-window": "local_window",
             "--esa-chunk": "chunk_size", "--esa-proximity": "proximity", "--esa-select-per": "select_per",
             "--esa-far-positions": "far_positions", "--esa-far-distance": "far_distance",
             "--esa-projections": "projections", "--esa-rank": "rank"}


def _esa_args(p: argparse.ArgumentParser) -> None:
    from ds_msattn.attention.esa import DEFAULT_ESA, FAR_POSITIONS as ESA_FAR, SELECT_PER as ESA_SELECT

    d = DEFAULT_ESA
    p.add_argument("--esa-top-k", type=int, default=None, help=f"esa: middle tokens selected per chunk ({d['top_k']})")
    p.add_argument("--esa-sink-tokens", type=int, default=None, help=f"esa: initial tokens ({d['sink_tokens']})")
    p.add_argument("--esa-local-window", type=int, default=None, help=f"esa: local tokens ({d['local_window']})")
    p.add_argument("--esa-chunk", type=int, default=None, help=f"esa: queries per chunk ({d['chunk_size']})")
    p.add_argument("--esa-proximity", type=int, default=None, help=f"esa: proximity distance epsilon ({d['proximity']})")
    p.add_argument("--esa-select-per", default=None, choices=list(ESA_SELECT), help="esa: one selection per layer or kv group")
    p.add_argument("--esa-far-positions", default=None, choices=list(ESA_FAR),
                   help="esa: selected and initial tokens at a fixed distance (paper) or their own positions")
    p.add_argument("--esa-far-distance", type=int, default=None, help="esa: w of fixed (default: the local window)")
    p.add_argument("--esa-projections", default=None, help="esa: directory of ds-msattn esa-calibrate (default: none, "
                   "full-dimensional scores)")
    p.add_argument("--esa-rank", type=int, default=None, help="esa: use the first r calibrated dimensions")


def _esa_params(args, parser) -> dict | None:
    """``config.esa_attention`` of ``--attn esa_attention`` (None otherwise); misuse is a one-line error (exit 2)."""
    given = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, key in ESA_FLAGS.items()}
    if args.attn != "esa_attention":
        for flag, key in ESA_FLAGS.items():
            if given[key] is not None:
                parser.error(f"{flag} needs --attn esa_attention")
        return None
    if args.task not in ("passkey", "ppl"):
        parser.error(f"--attn esa_attention is for eval passkey and eval ppl, not {args.task} (it runs MS attention)")
    params = {key: value for key, value in given.items() if value is not None}
    from types import SimpleNamespace

    from ds_msattn.hf_esa import esa_attention_params

    try:
        esa_attention_params(SimpleNamespace(esa_attention=params))
    except ValueError as e:
        parser.error(f"--attn esa_attention: {e}")
    return params


def _kv_policy(args, parser):
    """The H2O policy of ``--kv-cache h2o`` (None without); flag misuse is a one-line error (exit code 2)."""
    if not hasattr(args, "kv_cache"):  # stream has its own memory bound
        return None
    if args.kv_cache == "none":
        flags = {"--kv-budget": args.kv_budget, "--recent": args.recent, "--kv-chunk": args.kv_chunk}
        for flag, value in flags.items():
            if value is not None:
                parser.error(f"{flag} needs --kv-cache h2o")
        return None
    if args.kv_budget is None:
        parser.error("--kv-cache h2o needs --kv-budget N")
    if args.attn not in ("sdpa", "eager"):
        parser.error(f"--kv-cache h2o computes its own dense attention over the kept cache: use --attn sdpa, "
                     f"not {args.attn}")
    if getattr(args, "diagnose", False):
        parser.error("--diagnose needs --attn ms_attention, not --kv-cache h2o")
    from .h2o import DEFAULT_CHUNK, H2OPolicy

    try:
        return H2OPolicy(budget=args.kv_budget, recent=args.kv_budget // 2 if args.recent is None else args.recent,
                         chunk=DEFAULT_CHUNK if args.kv_chunk is None else args.kv_chunk)
    except ValueError as e:
        parser.error(f"--kv-cache h2o: {e}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="ds-msattn eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval accuracy per length and depth")
    _model_args(pk)
    pk.add_argument("--lengths", type=_ints, required=True, help="e.g. 4096,8192,16384")
    pk.add_argument("--depths", type=_floats, default=None, help="e.g. 0,0.5,1 (default: random depth per trial)")
    pk.add_argument("--trials", type=int, default=3, help="trials per length (per depth when --depths is given)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--max-new-tokens", type=int, default=8)
    pk.add_argument("--haystack", default="filler", choices=["filler", "corpus"],
                    help="repeated filler sentences, or running text of held-out works of the built-in corpus")
    pk.add_argument("--diagnose", action="store_true",
                    help="needle recall: did the answering block select a region holding the key (ms_attention)")
    pk.add_argument("--trials-file", default=None,
                    help="JSON lines: each trial appended when it ends; trials already there are not rerun (resume)")
    _kv_cache_args(pk)
    _esa_args(pk)
    pp = sub.add_parser("ppl", help="perplexity per context length")
    _model_args(pp)
    src = pp.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", default=None)
    src.add_argument("--corpus", default=None, help="built-in corpus name (shakespeare)")
    pp.add_argument("--context", type=_ints, required=True, help="e.g. 2048,8192")
    pp.add_argument("--stride", type=int, default=None, help="sliding stride (default: non-overlapping)")
    pp.add_argument("--max-windows", type=int, default=None, help="windows per context length")
    pp.add_argument("--max-tokens", type=int, default=None, help="tokens per document read")
    _kv_cache_args(pp)
    _esa_args(pp)
    from .stream import add_stream_args

    add_stream_args(sub, _model_args)
    return parser


def _spec(args, esa: dict | None = None):
    from .loading import EvalModelSpec

    ms = dict(region_size=args.region_size, top_k=args.top_k, merge=args.merge, sink_regions=args.sink_regions,
              backend=args.backend)
    for key in MODEL_OPTIONS:  # options left unset take the package defaults
        value = getattr(args, key)
        if value is not None:
            ms[key] = value
    return EvalModelSpec(model=args.model, adapter=args.adapter, attention=args.attn, ms_params=ms, rope=args.rope,
                         rope_factor=args.rope_factor, rope_length=args.rope_length, esa_params=esa, dtype=args.dtype)


def _texts(args) -> dict[str, str]:
    if args.text_file:
        return {Path(args.text_file).stem: Path(args.text_file).read_text(encoding="utf-8", errors="replace")}
    from ds_msattn.corpora import corpus_texts

    return corpus_texts(args.corpus)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    policy = _kv_policy(args, build_parser())
    esa = _esa_params(args, build_parser())
    if getattr(args, "diagnose", False) and args.attn != "ms_attention":
        build_parser().error("--diagnose needs --attn ms_attention (it reports what MS selection picked)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, flush=True))
    spec = _spec(args, esa)
    from ds_msattn.models import load_tokenizer

    from .loading import load_eval_model, prepare_length

    text_file = getattr(args, "text_file", None)
    if text_file and not Path(text_file).is_file():  # before the model loads
        raise FileNotFoundError(2, "No such file or directory", text_file)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)  # a bad --model fails here, before any output
    say(f"eval {args.task}: loading {args.model} ({spec.describe()})")
    model = load_eval_model(spec, device=args.device)
    if policy is not None:
        from .h2o import H2OModel

        say(f"eval {args.task}: KV cache {policy.describe()}")
        model = H2OModel(model, policy)
    from ds_msattn.progress import LayerProgress, progress_bar

    layers = model.model.layers  # progress bars advance per decoder layer of each prefill
    report = {
        "command": "ds-msattn eval " + shlex.join(argv), "model": args.model, "setup": spec.describe(),
        "attention": args.attn, "rope": args.rope, "rope_factor": args.rope_factor, "adapter": args.adapter,
        # what ran: options left unset take the model defaults
        "ms_attention": {**MODEL_OPTIONS, **spec.ms_params} if args.attn == "ms_attention" else None, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "kv_cache": None if policy is None else {"policy": "h2o", "budget": policy.budget, "recent": policy.recent,
                                                 "heavy": policy.heavy, "chunk": policy.chunk},
    }
    if esa is not None:  # what ran: unset keys take the defaults of ds_msattn/hf_esa.py
        report["esa_attention"] = spec.esa_resolved()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.task == "passkey":
        from .passkey import run_passkey
        from .plots import plot_passkey

        per_length = args.trials * (len(args.depths) if args.depths else 1)
        ticker = LayerProgress(None, layers)  # one bar per length: its trials cost alike

        def prepare(n: int) -> None:
            where = f" (length {args.lengths.index(n) + 1} of {len(args.lengths)})" if len(args.lengths) > 1 else ""
            ticker.next_bar(progress_bar(per_length, f"passkey at {n}{where}", "trials"), unit_tokens=n)
            prepare_length(model, spec, n)

        try:
            res = run_passkey(model, tokenizer, lengths=args.lengths, depths=args.depths, trials=args.trials,
                              seed=args.seed, max_new_tokens=args.max_new_tokens, prepare=prepare,
                              log=log, haystack=args.haystack,
                              diagnose=args.diagnose, trials_file=args.trials_file,
                              resumed=lambda _: ticker.skip_unit())
        finally:
            ticker.close()
        report.update(res)
        plot_passkey(report, out.with_suffix(".png"))
    elif args.task == "ppl":
        from .plots import plot_ppl
        from .ppl import count_windows, perplexity, tokenize_documents

        enough = (max(args.context), args.max_windows) if args.max_windows else None
        docs = tokenize_documents(tokenizer, _texts(args), min_tokens=min(args.context), enough=enough)
        if args.max_tokens:
            docs = [(n, ids[: args.max_tokens]) for n, ids in docs]
        report["documents"] = [n for n, _ in docs]
        rows = []
        for ctx in args.context:
            prepare_length(model, spec, ctx)
            ids_list = [ids for _, ids in docs]
            ticker = LayerProgress(progress_bar(count_windows(ids_list, ctx, args.stride, args.max_windows),
                                                f"ppl at {ctx}", "windows"), layers, unit_tokens=ctx)
            try:
                row = perplexity(model, ids_list, ctx, args.stride, args.max_windows, log=log)
            finally:
                ticker.close()
            log(f"ppl L={ctx}: {row['ppl']:.3f} over {row['scored_tokens']} tokens, {row['windows']} windows, {row['seconds']} s")
            rows.append(row)
        report["results"] = rows
        plot_ppl(report, out.with_suffix(".png"))
    else:  # stream (alias recursive)
        from .stream import run_stream

        report.update(run_stream(args, model, tokenizer, spec, None if args.passkey_lengths else _texts(args), log))
    report["seconds_total"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("ds-msattn eval", main, sys.argv[1:]))
