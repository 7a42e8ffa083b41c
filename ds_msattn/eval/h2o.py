"""H2O KV-cache eviction (Zhang et al., "H2O: Heavy-Hitter Oracle", arXiv 2306.14048) for ``ds-msattn eval``.

Followed from the public code, ``h2o_hf/utils_real_drop/modify_llama.py`` of FMInference/H2O
(``H2OKVCache_LayerWise``), and applied by SinkLoRA (arXiv 2406.05678) at inference:

- Each layer keeps, per (batch row, kv head), at most ``budget`` cached tokens between steps: the ``recent`` most
  recent ones and the ``budget - recent`` *heavy hitters*, the older tokens with the largest accumulated attention.
- A token's score is the attention probability it received, summed over every query that saw it while it was cached
  (H2O's ``_update_hh_score``: ``attn.sum(0).sum(1)``, over the batch and the queries). With grouped-query attention
  the query heads of a kv head share its cache, so their probabilities are summed too (H2O's Llama has Hq = Hkv).
- Eviction after each step, as ``H2OKVCache_LayerWise.__call__``: keep the last ``recent`` entries and the top
  ``budget - recent`` of the others by score (ties: the earlier token), in token order; kept tokens keep their scores.
  Keys stay rotated at their original positions (no position rolling: H2O's plain, not ``_streaming``, variant).

Steps: H2O's generation prefills the whole prompt densely, then evicts and decodes one token per step. Here the
input is processed in steps of at most ``chunk`` tokens (each step's queries see the kept cache plus their own
step causally, so a step sees at most ``budget + chunk`` keys) and each generated token is one step.
``chunk=1`` is H2O's per-token rule everywhere (its Algorithm 1); a chunk as long as the prompt is its dense prefill
(which would make perplexity plain dense attention, hence the default of 64).

:class:`H2OModel` wraps a causal LM so that ``ds_msattn.eval.passkey`` (greedy decoding with a cache) and
``ds_msattn.eval.ppl`` (``model.model(...).last_hidden_state``) run through this cache unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

NAME = "h2o_attention"
DEFAULT_CHUNK = 64
#: Queries scored at once inside a step (bounds the [Hq, block, keys] probabilities of a long step).
QUERY_BLOCK = 512


@dataclass(frozen=True)
class H2OPolicy:
    """How many tokens each layer keeps between steps, and how many tokens one step processes."""

    budget: int
    """kept tokens per layer and kv head: heavy hitters + recent (H2O's hh_size + recent_size)"""
    recent: int
    """the most recent tokens always kept (0 <= recent <= budget)"""
    chunk: int = DEFAULT_CHUNK
    """tokens per step when the input is processed (1: H2O's per-token rule)"""

    def __post_init__(self):
        for key, value, low in (("kv_budget", self.budget, 1), ("recent", self.recent, 0), ("kv_chunk", self.chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if self.recent > self.budget:
            raise ValueError(f"recent must be <= kv_budget={self.budget}, got {self.recent}")

    @property
    def heavy(self) -> int:
        return self.budget - self.recent

    def describe(self) -> str:
        return f"h2o(budget={self.budget},recent={self.recent},heavy={self.heavy},chunk={self.chunk})"


def keep_indices(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Entries to keep of a cache of N > budget entries: scores ``[..., N]`` -> sorted indices ``[..., budget]``."""
    N = scores.shape[-1]
    older = scores[..., : N - recent]
    heavy = torch.sort(older, dim=-1, descending=True, stable=True).indices[..., : budget - recent]
    tail = torch.arange(N - recent, N, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.cat([heavy.sort(dim=-1).values, tail], dim=-1)


class H2OLayer(DynamicLayer):
    """One layer's cache: keys/values ``[B, Hkv, N, D]``, scores and token positions ``[B, Hkv, N]``."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.scores = torch.zeros(*key_states.shape[:2], 0, dtype=torch.float64, device=key_states.device)
        self.positions = torch.zeros(*key_states.shape[:2], 0, dtype=torch.long, device=key_states.device)

    def observe_and_evict(self, received: torch.Tensor, new_positions: torch.Tensor, policy: H2OPolicy) -> None:
        """Add this step's attention ``received [B, Hkv, N]`` (the new tokens last), then cut to the budget."""
        B, H = received.shape[:2]
        new = received.shape[-1] - self.scores.shape[-1]
        self.scores = torch.cat([self.scores, self.scores.new_zeros(B, H, new)], dim=-1) + received.double()
        self.positions = torch.cat([self.positions, new_positions.to(self.positions.device).expand(B, H, new)], -1)
        if self.scores.shape[-1] <= policy.budget:
            return
        keep = keep_indices(self.scores, policy.budget, policy.recent)  # [B, Hkv, budget]
        gather = keep[..., None]
        self.keys = self.keys.gather(2, gather.expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1]))
        self.scores, self.positions = self.scores.gather(2, keep), self.positions.gather(2, keep)


class H2OCache(Cache):
    """Per-layer :class:`H2OLayer` caches under one :class:`H2OPolicy`; ``seen`` counts the tokens processed."""

    def __init__(self, policy: H2OPolicy, num_layers: int):
        super().__init__(layers=[H2OLayer() for _ in range(num_layers)])
        self.policy = policy
        self.seen = 0


def _h2o_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           h2o_cache: H2OCache | None = None, position_ids=None, **kwargs):
    """Dense attention over the kept cache plus the step's own tokens, then H2O's score update and eviction.

    query ``[B, Hq, Tq, D]``; key/value ``[B, Hkv, Tk, D]`` (kept cache, then the step's Tq tokens) ->
    ``([B, Tq, Hq, Dv], None)``.
    """
    if h2o_cache is None:
        raise ValueError("h2o_attention needs an H2OCache: run the model through ds_msattn.eval.h2o.H2OModel")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("h2o_attention does not support padded batches")
    B, Hq, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    rep = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = torch.empty(B, Hq, Tq, value.shape[-1], dtype=query.dtype, device=query.device)
    received = torch.zeros(B, Hq, Tk, dtype=torch.float32, device=query.device)
    keys = torch.arange(Tk, device=query.device)
    for a in range(0, Tq, QUERY_BLOCK):
        b = min(Tq, a + QUERY_BLOCK)
        scores = (query[:, :, a:b].float() @ k.float().transpose(-1, -2)) * scale  # [B, Hq, n, Tk]
        allowed = keys[None, :] <= (Tk - Tq + torch.arange(a, b, device=query.device))[:, None]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[:, :, a:b] = (probs @ v.float()).to(query.dtype)
        received += probs.sum(2)
    positions = position_ids.view(-1)[-Tq:] if position_ids is not None else torch.arange(Tk - Tq, Tk)
    h2o_cache.layers[module.layer_idx].observe_and_evict(
        received.view(B, Hkv, rep, Tk).sum(2), positions.to(query.device), h2o_cache.policy)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _h2o_attention_forward)
AttentionMaskInterface.register(NAME, flash_attention_mask)


class _Backbone:
    """``model.model`` of an :class:`H2OModel`: a forward over ``input_ids`` through a fresh cache (perplexity)."""

    def __init__(self, owner: H2OModel):
        self._owner = owner
        self.layers = owner.base.model.layers

    def __call__(self, input_ids, use_cache: bool = False, **kwargs) -> BaseModelOutputWithPast:
        cache = self._owner.new_cache()
        return BaseModelOutputWithPast(last_hidden_state=self._owner.run(input_ids, cache), past_key_values=cache)


class H2OModel(torch.nn.Module):
    """A causal LM whose every forward goes through an :class:`H2OCache` in steps of ``policy.chunk`` tokens.

    ``model(input_ids, past_key_values=...)``: a cache that is not an H2OCache (None, or the empty DynamicCache of
    ``greedy_generate``) starts a new one; the returned ``past_key_values`` is the H2OCache to pass back.
    ``model.model(input_ids)``: hidden states of a whole input through a fresh cache. The wrapped model is a
    submodule, so ``parameters()`` and ``modules()`` (CRD-NTK's rotary rebuild) reach it.
    """

    def __init__(self, model, policy: H2OPolicy):
        super().__init__()
        self.base = model
        self.policy = policy
        self.config = model.config
        model.config._attn_implementation = NAME
        self.model = _Backbone(self)

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def new_cache(self) -> H2OCache:
        return H2OCache(self.policy, self.config.num_hidden_layers)

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, cache: H2OCache) -> torch.Tensor:
        """``input_ids [B, T]`` after the ``cache.seen`` tokens already processed -> hidden states ``[B, T, H]``."""
        device = next(self.base.parameters()).device
        input_ids = input_ids.to(device)
        parts = []
        for a in range(0, input_ids.shape[1], self.policy.chunk):
            b = min(input_ids.shape[1], a + self.policy.chunk)
            positions = torch.arange(cache.seen + a, cache.seen + b, device=device)[None]
            out = self.base.model(input_ids=input_ids[:, a:b], position_ids=positions, past_key_values=cache,
                                  use_cache=True, h2o_cache=cache)
            parts.append(out.last_hidden_state)
        cache.seen += input_ids.shape[1]
        return torch.cat(parts, dim=1)

    def forward(self, input_ids, past_key_values=None, use_cache: bool = True, logits_to_keep: int = 0,
                position_ids=None, **kwargs) -> CausalLMOutputWithPast:
        cache = past_key_values if isinstance(past_key_values, H2OCache) else self.new_cache()
        if position_ids is not None and int(position_ids.view(-1)[0]) != cache.seen:
            raise ValueError(f"H2OModel continues at position {cache.seen}, got position_ids from "
                             f"{int(position_ids.view(-1)[0])}")
        hidden = self.run(input_ids, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.base.get_output_embeddings()(hidden), past_key_values=cache)
