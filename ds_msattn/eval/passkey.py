"""Passkey retrieval (DESIGN.md, Evaluation): prompt generator, greedy generation, scorer.

The prompt is built from token ids so that its length is exact: filler sentences repeated, the key
sentence after a fraction ``depth`` of the filler, the question last. Pieces are tokenized
separately (each starts with a space, so byte-level BPE splits them as it would in running text).

Haystacks: ``filler`` (the repeated sentences above, as defined) or ``corpus``: running text of held-out works
of the built-in corpus (:func:`corpus_haystack`), a contiguous slice from a seeded offset per trial, the key
sentence set off as its own paragraph at the first line break after ``depth``, an instruction first
(:data:`CORPUS_INSTRUCTION`) and a quiz question last (:data:`CORPUS_QUESTION`). Filler is easy to tell apart from
the key; prose is not. Without the instruction and the quiz wording, dense SmolLM2-135M continued the play instead
of answering even at 2K tokens (0/3 with the filler's question after a paragraph break; 3/3 at 2K and 2/3 at 8K
with this framing, which is the usual passkey prompt of LongLoRA and landmark attention in our words).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
HAYSTACKS = ("filler", "corpus")
CORPUS_INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                      "memorize it. I will quiz you about the important information there.\n\n")
CORPUS_QUESTION = "\n\nNow the quiz. What is the pass key mentioned in the text above? The pass key is"
#: Works of the built-in corpus (sorted names, from the end) that corpus haystacks are cut from: a fine-tune that
#: reads ``data.max_documents <= 42 - HELD_OUT_WORKS`` works never saw them.
HELD_OUT_WORKS = 6


@dataclass
class PasskeyPrompt:
    """One trial: ``input_ids`` (exactly ``length`` tokens), the key and where it was put."""

    input_ids: list[int]
    key: int
    depth: float
    key_token_start: int
    key_token_end: int = 0
    haystack_offset: int | None = None


def corpus_haystack(tokenizer, corpus: str = "shakespeare", works: int = HELD_OUT_WORKS) -> tuple[list[int], list[str]]:
    """Token ids of the last ``works`` works of a built-in corpus (sorted names, read from the end), joined."""
    from ds_msattn.corpora import corpus_texts

    texts = corpus_texts(corpus)
    names = sorted(texts)[-works:][::-1]
    ids: list[int] = []
    for name in names:
        ids += tokenizer(texts[name] + "\n\n", add_special_tokens=False)["input_ids"]
    return ids, names


def passkey_keys(seed: int, n: int, low: int = 10000, high: int = 99999) -> list[int]:
    """``n`` keys in ``[low, high]`` from a generator seeded by ``seed`` (same seed, same keys)."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def make_passkey_prompt(
    tokenizer, length: int, key: int, depth: float, haystack: list[int] | None = None, offset: int = 0
) -> PasskeyPrompt:
    """Prompt of exactly ``length`` tokens with ``key`` after ``depth`` (0..1) of the haystack.

    ``haystack`` (token ids, see :func:`corpus_haystack`) replaces the filler: ``length`` tokens from ``offset``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if not isinstance(key, int) or key < 0:
        raise ValueError(f"key must be a non-negative integer, got {key!r}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if haystack is None:
        head, key_ids, question = [], enc(KEY_SENTENCE.format(key=key)), enc(QUESTION)
    else:
        head, question = enc(CORPUS_INSTRUCTION), enc(CORPUS_QUESTION)
        key_ids = enc("\n\n" + KEY_SENTENCE.format(key=key).strip() + "\n\n")
    budget = length - len(head) - len(key_ids) - len(question)
    if budget < 0:
        raise ValueError(f"length must be at least {length - budget} tokens for the key and question, got {length}")
    if haystack is None:
        # Filler token stream cut to the budget; the key goes in at a filler-unit boundary near depth.
        filler = enc(FILLER)
        units, rest = divmod(budget, len(filler))
        stream = filler * units + filler[:rest]
        cut = min(round(depth * units) * len(filler), len(stream))
    else:
        if len(haystack) < budget:
            raise ValueError(f"the corpus haystack has {len(haystack)} tokens, fewer than the {budget} this length needs")
        offset = offset % (len(haystack) - budget + 1)
        stream = haystack[offset : offset + budget]
        cut = round(depth * budget)
        newline = enc("\n")[-1]
        after = [i for i in range(cut, min(budget, cut + 400)) if stream[i] == newline]  # the next line break
        cut = after[0] + 1 if after else cut
    ids = head + stream[:cut] + key_ids + stream[cut:] + question
    assert len(ids) == length
    start = len(head) + cut
    return PasskeyPrompt(input_ids=ids, key=key, depth=depth, key_token_start=start, key_token_end=start + len(key_ids),
                         haystack_offset=None if haystack is None else offset)


def first_integer(text: str) -> int | None:
    """The first run of digits in ``text`` as an int (None when there is none)."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def score(generated_text: str, key: int) -> bool:
    """A trial passes when the first integer of the continuation is the key."""
    return first_integer(generated_text) == key


@torch.no_grad()
def greedy_generate(model, input_ids: list[int] | torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation with a KV cache: one prefill (logits of the last position only), then one token per step.

    Decoding under ``attn_implementation="ms_attention"`` goes through ``ms_attention_decode`` (hf.py).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).view(1, -1)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    new: list[int] = []
    pos = ids.shape[1]
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if len(new) == max_new_tokens:
            break
        step = torch.tensor([[token]], device=device)
        out = model(
            input_ids=step, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1,
            position_ids=torch.tensor([[pos]], device=device), cache_position=torch.tensor([pos], device=device),
        )
        pos += 1
    return new


def run_passkey(
    model, tokenizer, *, lengths: list[int], depths: list[float] | None, trials: int, seed: int = 0,
    max_new_tokens: int = 8, prepare=None, log=print, haystack: str = "filler", diagnose: bool = False,
    trials_file: str | Path | None = None, resumed=None,
) -> dict:
    """Trials per length (and per depth; random depths when ``depths`` is None) -> results dict.

    ``prepare(length)`` is called before each length (static CRD-NTK base). Keys, random depths and corpus
    offsets come from generators seeded by ``seed`` and the length, so rows of a table share their prompts.
    ``haystack``: ``filler`` or ``corpus``. ``diagnose`` adds the needle recall of each trial
    (:mod:`ds_msattn.eval.needle`; ms_attention only). ``trials_file`` (JSON lines): each finished trial is
    appended as it ends, and trials already there (same length, depth, trial, key, haystack) are not run again;
    ``resumed(record)`` is called for each of those.
    """
    import time

    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    stream, works = corpus_haystack(tokenizer) if haystack == "corpus" else (None, None)
    done = {}
    if trials_file is not None and Path(trials_file).exists():
        for line in Path(trials_file).read_text().splitlines():
            rec = json.loads(line)
            done[(rec["length"], rec["depth"], rec["trial"], rec["key"], rec.get("haystack", "filler"))] = rec
    probe = None
    if diagnose:
        from ds_msattn import hf

        from .needle import NeedleProbe

        probe = NeedleProbe()
        hf.set_attention_probe(probe)
    records = []
    try:
        for length in lengths:
            if prepare is not None:
                prepare(length)
            rng = random.Random(f"{seed}-{length}")
            plan = [(d, t) for d in depths for t in range(trials)] if depths else [(rng.random(), t) for t in range(trials)]
            keys = passkey_keys(seed * 1_000_003 + length, len(plan))
            offsets = random.Random(f"{seed}-{length}-offsets")
            for (depth, trial), key in zip(plan, keys):
                offset = offsets.randrange(1 << 30)
                previous = done.get((length, round(depth, 4), trial, key, haystack))
                if previous is not None:
                    records.append(previous)
                    if resumed is not None:
                        resumed(previous)
                    continue
                prompt = make_passkey_prompt(tokenizer, length, key, depth, haystack=stream, offset=offset)
                if probe is not None:
                    probe.reset((prompt.key_token_start, prompt.key_token_end))
                t0 = time.perf_counter()
                new = greedy_generate(model, prompt.input_ids, max_new_tokens)
                text = tokenizer.decode(new)
                rec = dict(
                    length=length, depth=round(depth, 4), trial=trial, key=key, haystack=haystack, generated=text,
                    found=first_integer(text), passed=score(text, key), seconds=round(time.perf_counter() - t0, 2),
                    key_tokens=[prompt.key_token_start, prompt.key_token_end],
                )
                if stream is not None:
                    rec.update(haystack_offset=prompt.haystack_offset, haystack_works=works)
                if probe is not None:
                    rec["needle"] = probe.summary()
                records.append(rec)
                if trials_file is not None:
                    with open(trials_file, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                recall = f" needle {rec['needle']['prefill_selected']}" if probe is not None else ""
                log(f"passkey L={length} depth={rec['depth']} key={key} -> {text!r} "
                    f"{'PASS' if rec['passed'] else 'fail'}{recall} ({rec['seconds']} s)")
    finally:
        if probe is not None:
            from ds_msattn import hf

            hf.set_attention_probe(None)
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Accuracy per length and per (length, depth) from trial records (and needle recall when diagnosed)."""
    by_len: dict[int, list[bool]] = {}
    by_depth: dict[int, dict[float, list[bool]]] = {}
    recall: dict[int, list[float]] = {}
    for r in records:
        by_len.setdefault(r["length"], []).append(r["passed"])
        by_depth.setdefault(r["length"], {}).setdefault(r["depth"], []).append(r["passed"])
        if "needle" in r:
            recall.setdefault(r["length"], []).append(r["needle"]["prefill_recall"])
    out = {
        "accuracy": {str(k): sum(v) / len(v) for k, v in by_len.items()},
        "passed": {str(k): f"{sum(v)}/{len(v)}" for k, v in by_len.items()},
        "accuracy_by_depth": {str(k): {str(d): sum(x) / len(x) for d, x in v.items()} for k, v in by_depth.items()},
        "trials": records,
    }
    if recall:
        out["needle_recall"] = {str(k): round(sum(v) / len(v), 4) for k, v in recall.items()}
    return out
