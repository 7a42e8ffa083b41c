"""Perplexity of long documents at a given context length, windowed.

Windows lie inside one document. Non-overlapping by default: window i is tokens
``[i*L, (i+1)*L)`` and scores its own next-token predictions (``L - 1`` of them). With a stride
``S < L`` (sliding), windows start every S tokens and each scores only the targets that no earlier
window scored, each with up to L tokens of context. Logits are never built for a whole long window
at once (32K x 49K vocab would be 6 GB): the final hidden states go through the LM head in chunks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Positions whose logits are materialised at once.
LOGIT_CHUNK = 1024


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` of a document; targets at window offsets ``>= first_target`` are scored."""

    start: int
    end: int
    first_target: int


def make_windows(n_tokens: int, context: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    """Windows over a document of ``n_tokens`` (see module docstring); only full-length windows."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    out: list[Window] = []
    scored_until = 0  # targets (token indices) below this are already scored
    start = 0
    while start + context <= n_tokens and (max_windows is None or len(out) < max_windows):
        end = start + context
        first = max(1, scored_until - start)
        out.append(Window(start, end, first))
        scored_until = end
        start += stride
    return out


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, first_target: int = 1) -> tuple[float, int]:
    """Summed next-token NLL of ``ids [T]`` for targets at offsets ``>= first_target`` -> (sum, count)."""
    ids = ids.to(next(model.parameters()).device)
    hidden = model.model(input_ids=ids.view(1, -1), use_cache=False).last_hidden_state[0]  # [T, H]
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    T = ids.shape[0]
    for a in range(first_target - 1, T - 1, LOGIT_CHUNK):
        b = min(T - 1, a + LOGIT_CHUNK)
        logits = head(hidden[a:b]).float()  # [n, V] predicts tokens a+1 .. b
        total += float(F.cross_entropy(logits, ids[a + 1 : b + 1], reduction="sum"))
        count += b - a
    return total, count


def count_windows(documents: list[torch.Tensor], context: int, stride: int | None = None,
                  max_windows: int | None = None) -> int:
    """How many windows :func:`perplexity` scores (for a progress bar)."""
    n = sum(len(make_windows(ids.shape[0], context, stride)) for ids in documents)
    return n if max_windows is None else min(n, max_windows)


def perplexity(model, documents: list[torch.Tensor], context: int, stride: int | None = None,
               max_windows: int | None = None, log=print, progress=None) -> dict:
    """Perplexity at ``context`` over windows of ``documents`` (token id tensors), at most ``max_windows`` in all.

    ``progress(n)`` (e.g. a tqdm bar's ``update``) is called after each window.
    """
    total, count, used = 0.0, 0, 0
    t0 = time.perf_counter()
    for doc_index, ids in enumerate(documents):
        left = None if max_windows is None else max_windows - used
        if left == 0:
            break
        for w in make_windows(ids.shape[0], context, stride, left):
            nll, n = window_nll(model, ids[w.start : w.end], w.first_target)
            total, count, used = total + nll, count + n, used + 1
            log(f"ppl L={context} doc {doc_index} [{w.start}, {w.end}) nll/token {nll / n:.4f}")
            if progress is not None:
                progress(1)
    if count == 0:
        raise ValueError(f"no document has {context} tokens: no window to score at this context length")
    return {
        "context": context, "ppl": math.exp(total / count), "nll_per_token": total / count, "scored_tokens": count,
        "windows": used, "seconds": round(time.perf_counter() - t0, 1),
    }


def tokenize_documents(
    tokenizer, texts: dict[str, str], min_tokens: int = 0, max_documents: int | None = None,
    enough: tuple[int, int] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Longest documents first (by characters), tokenized, keeping those with ``>= min_tokens`` tokens.

    Stops after ``max_documents`` kept, or once ``enough = (L, n)``: n kept documents have ``>= L`` tokens
    (tokenizing a whole corpus is slow and a few long documents are all that long windows need).
    """
    out, long_ones = [], 0
    for name, text in sorted(texts.items(), key=lambda kv: -len(kv[1])):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if ids.shape[0] >= min_tokens:
            out.append((name, ids))
            long_ones += enough is not None and ids.shape[0] >= enough[0]
        if max_documents is not None and len(out) >= max_documents:
            break
        if enough is not None and long_ones >= enough[1]:
            break
    return out
