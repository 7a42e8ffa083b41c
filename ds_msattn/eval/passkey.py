"""Passkey retrieval (DESIGN.md, Evaluation): prompt generator, greedy generation, scorer.

The prompt is built from token ids so that its length is exact: filler sentences repeated, the key
sentence after a fraction ``depth`` of the filler, the question last. Pieces are tokenized
separately (each starts with a space, so byte-level BPE splits them as it would in running text).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    """One trial: ``input_ids`` (exactly ``length`` tokens), the key and where it was put."""

    input_ids: list[int]
    key: int
    depth: float
    key_token_start: int


def passkey_keys(seed: int, n: int, low: int = 10000, high: int = 99999) -> list[int]:
    """``n`` keys in ``[low, high]`` from a generator seeded by ``seed`` (same seed, same keys)."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def make_passkey_prompt(tokenizer, length: int, key: int, depth: float) -> PasskeyPrompt:
    """Prompt of exactly ``length`` tokens with ``key`` after ``depth`` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if not isinstance(key, int) or key < 0:
        raise ValueError(f"key must be a non-negative integer, got {key!r}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler, key_ids, question = enc(FILLER), enc(KEY_SENTENCE.format(key=key)), enc(QUESTION)
    budget = length - len(key_ids) - len(question)
    if budget < 0:
        raise ValueError(f"length must be at least {len(key_ids) + len(question)} tokens for the key and question, got {length}")
    # Filler token stream cut to the budget; the key goes in at a filler-unit boundary near depth.
    units, rest = divmod(budget, len(filler))
    stream = filler * units + filler[:rest]
    cut = round(depth * units) * len(filler)
    cut = min(cut, len(stream))
    ids = stream[:cut] + key_ids + stream[cut:] + question
    assert len(ids) == length
    return PasskeyPrompt(input_ids=ids, key=key, depth=depth, key_token_start=cut)


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
    max_new_tokens: int = 8, prepare=None, log=print,
) -> dict:
    """Trials per length (and per depth; random depths when ``depths`` is None) -> results dict.

    ``prepare(length)`` is called before each length (static CRD-NTK base). Keys and random depths
    come from generators seeded by ``seed`` and the length, so rows of a table share their prompts.
    """
    import time

    records = []
    for length in lengths:
        if prepare is not None:
            prepare(length)
        rng = random.Random(f"{seed}-{length}")
        plan = [(d, t) for d in depths for t in range(trials)] if depths else [(rng.random(), t) for t in range(trials)]
        keys = passkey_keys(seed * 1_000_003 + length, len(plan))
        for (depth, trial), key in zip(plan, keys):
            prompt = make_passkey_prompt(tokenizer, length, key, depth)
            t0 = time.perf_counter()
            new = greedy_generate(model, prompt.input_ids, max_new_tokens)
            text = tokenizer.decode(new)
            rec = dict(
                length=length, depth=round(depth, 4), trial=trial, key=key, generated=text,
                found=first_integer(text), passed=score(text, key), seconds=round(time.perf_counter() - t0, 2),
            )
            records.append(rec)
            log(f"passkey L={length} depth={rec['depth']} key={key} -> {text!r} {'PASS' if rec['passed'] else 'fail'} ({rec['seconds']} s)")
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Accuracy per length and per (length, depth) from trial records."""
    by_len: dict[int, list[bool]] = {}
    by_depth: dict[int, dict[float, list[bool]]] = {}
    for r in records:
        by_len.setdefault(r["length"], []).append(r["passed"])
        by_depth.setdefault(r["length"], {}).setdefault(r["depth"], []).append(r["passed"])
    return {
        "accuracy": {str(k): sum(v) / len(v) for k, v in by_len.items()},
        "passed": {str(k): f"{sum(v)}/{len(v)}" for k, v in by_len.items()},
        "accuracy_by_depth": {str(k): {str(d): sum(x) / len(x) for d, x in v.items()} for k, v in by_depth.items()},
        "trials": records,
    }
