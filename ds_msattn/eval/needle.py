"""Needle recall: did the answering query block select a region that holds the key sentence?

A passkey failure has two readings: the key's regions were never selected (selection missed the needle), or
they were selected and the model still did not read the key (positions, or the model itself). The probe tells
them apart. Installed with :func:`ds_msattn.hf.set_attention_probe`, it sees every ms_attention call and
recomputes, with the same shared selection code, only what the block that answers selects:

- prefill: the query block holding the prompt's last token (the question's end);
- each decode step: the decoded token (the per-token decode rule).

Per call it records, for every query head, whether any selected history region overlaps the key sentence's
tokens (or the key lies in the block's own causal part). Cost: the summaries of one block and of its history
per layer, nothing of size ``(T/c)^2``.
"""

from __future__ import annotations

import math

import torch

from ds_msattn.attention.decode import decode_selection
from ds_msattn.attention.options import make_options, unrotate
from ds_msattn.attention.selection import per_query_head, ranking_queries, region_means, select_history
from ds_msattn.hf import OPTION_KEYS


class NeedleProbe:
    """Callable probe; set ``span`` (key sentence tokens ``[start, end)``) before each trial, read ``records``."""

    def __init__(self):
        self.span: tuple[int, int] | None = None
        self.records: list[dict] = []

    def reset(self, span: tuple[int, int]) -> None:
        self.span = span
        self.records = []

    @torch.no_grad()
    def __call__(self, module, query, key, params) -> None:
        if self.span is None:
            return
        c, K, m, s = params["region_size"], params["top_k"], params["merge"], params["sink_regions"]
        options = make_options(**{name: params[name] for name in OPTION_KEYS})
        B, Hq, Tq, D = query.shape
        Hkv, Tk = key.shape[1], key.shape[2]
        mc = m * c
        t = Tk - 1  # the token that answers (prefill: the question's end; decode: the new token)
        b = t // mc
        start = b * mc
        hist = b * m
        budget = K - m
        key_lo, key_hi = self.span
        key_regions = set(range(key_lo // c, (key_hi - 1) // c + 1))
        local = key_hi > start  # the key (partly) lies in the block's own causal part
        positions = params.get("position_ids")
        inv_freq = params.get("rope_inv_freq")
        if local or hist <= budget:
            hit = [local or any(j < hist for j in key_regions)] * Hq
        else:
            sinks = min(s, budget)
            n = budget - sinks
            qs, ks = query, key[:, :, : hist * c]
            if options.score == "position_free":
                qs, ks = unrotate(qs, positions[:, Tk - Tq :], inv_freq), unrotate(ks, positions[:, : hist * c], inv_freq)
            kbar = region_means(ks, c)  # [B, Hkv, hist, D]
            if Tq == Tk:  # prefill: the block's query regions
                qbar = region_means(qs[:, :, start:], c)  # [B, Hq, <= m, D]
                if qbar.shape[2] < m:  # regions past the end repeat the block's first (as select_regions pads)
                    qbar = torch.cat([qbar, qbar[:, :, :1].expand(B, Hq, m - qbar.shape[2], D)], dim=2)
                qbar = ranking_queries(qbar, Hkv, options)
                sel = select_history(qbar[:, :, None], kbar, torch.tensor([b]), merge=m, sinks=sinks, n=n)[:, :, 0]
            else:  # decode: the new token's own query
                q_t = ranking_queries(qs[:, :, -1:], Hkv, options)
                sel = decode_selection(q_t, kbar, torch.tensor([t]), region_size=c, top_k=K, merge=m,
                                       sink_regions=s)[:, :, 0]
            sel = per_query_head(sel, Hq)[0]  # [Hq, S] (batch 1)
            hit = [bool(any(int(j) in key_regions for j in row if j >= 0)) for row in sel]
        self.records.append(dict(layer=int(getattr(module, "layer_idx", -1)), phase="prefill" if Tq == Tk else "decode",
                                 heads=hit))

    def summary(self) -> dict:
        """Fractions of (layer, query head) pairs that selected the key: prefill, each decode step, their mean."""
        prefill = [h for r in self.records if r["phase"] == "prefill" for h in r["heads"]]
        decode = [r for r in self.records if r["phase"] == "decode"]
        layers = max(1, len({r["layer"] for r in self.records}))
        steps = [decode[i : i + layers] for i in range(0, len(decode), layers)]
        per_step = [sum(sum(r["heads"]) for r in st) / max(1, sum(len(r["heads"]) for r in st)) for st in steps]
        return {
            "prefill_recall": round(sum(prefill) / len(prefill), 4) if prefill else math.nan,
            "prefill_selected": f"{sum(prefill)}/{len(prefill)}",
            "decode_recall": [round(x, 4) for x in per_step],
            "per_layer_prefill": [sum(r["heads"]) for r in self.records if r["phase"] == "prefill"],
        }
