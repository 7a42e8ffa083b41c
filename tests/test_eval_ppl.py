"""Perplexity windowing and the perplexity of a tiny model against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from ds_msattn.eval.ppl import make_windows, perplexity, window_nll


@pytest.mark.parametrize("n,context,stride", [(100, 10, None), (105, 10, None), (100, 10, 3), (57, 16, 16), (64, 8, 1)])
def test_windows_score_every_target_once(n, context, stride):
    ws = make_windows(n, context, stride)
    assert ws and all(w.end - w.start == context and w.end <= n for w in ws)
    targets = [w.start + j for w in ws for j in range(w.first_target, context)]
    assert len(targets) == len(set(targets))  # no target twice
    last = ws[-1].end
    if (stride or context) < context:  # sliding: every target up to the last window, none skipped
        assert sorted(targets) == list(range(1, last))
    else:  # non-overlapping: each window's first token has no context and is not a target
        assert sorted(targets) == [t for t in range(1, last) if t % context]
    if stride is None:
        assert [w.start for w in ws] == list(range(0, n - context + 1, context))


def test_windows_bad_input():
    with pytest.raises(ValueError, match="stride"):
        make_windows(100, 10, 11)
    with pytest.raises(ValueError, match="context"):
        make_windows(100, 1)
    assert make_windows(100, 10, max_windows=3)[-1].end == 30


def _tiny():
    from transformers import AutoModelForCausalLM

    from ds_msattn.models import tiny_llama_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="sdpa").eval()


@pytest.mark.parametrize("stride", [None, 12])
def test_perplexity_equals_hand_computation(stride, monkeypatch):
    import ds_msattn.eval.ppl as ppl_mod

    monkeypatch.setattr(ppl_mod, "LOGIT_CHUNK", 7)  # several logit chunks per window
    model = _tiny()
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 256, (83,), generator=g), torch.randint(0, 256, (40,), generator=g)]
    context = 32
    got = perplexity(model, docs, context, stride, log=lambda *_: None)
    # By hand: for each window, full logits, log-softmax, pick the scored targets.
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            step = stride or context
            scored = 0
            for start in range(0, ids.shape[0] - context + 1, step):
                w = ids[start : start + context]
                logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
                for j in range(1, context):
                    if start + j >= scored:
                        total -= float(logp[j - 1, w[j]])
                        count += 1
                scored = start + context
    assert got["scored_tokens"] == count
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_window_nll_first_target():
    model = _tiny()
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(5))
    full, n_full = window_nll(model, ids, 1)
    tail, n_tail = window_nll(model, ids, 11)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
    assert n_full == 19 and n_tail == 9
    assert tail == pytest.approx(-float(sum(logp[j - 1, ids[j]] for j in range(11, 20))), rel=1e-5)
    assert full == pytest.approx(-float(sum(logp[j - 1, ids[j]] for j in range(1, 20))), rel=1e-5)


def test_no_window_raises():
    with pytest.raises(ValueError, match="no document"):
        perplexity(_tiny(), [torch.zeros(10, dtype=torch.long)], 32, log=lambda *_: None)


@pytest.mark.parametrize("length,alpha", [(1024, 4.0), (8192, 4.0), (20000, 2.0)])
def test_crd_ntk_inference_base(length, alpha):
    """prepare_length sets inv_freq from b' = b * (alpha*L/L0 - (alpha-1)) ** (d/(d-2)), L = max(length, L0)."""
    from ds_msattn.eval.loading import EvalModelSpec, ntk_base, prepare_length

    model = _tiny()  # L0 = 4096, head dim 16, theta 1e4
    spec = EvalModelSpec(rope="crd-ntk", rope_factor=alpha)
    prepare_length(model, spec, length)
    L = max(length, 4096)
    want_base = 1e4 * (alpha * L / 4096 - (alpha - 1)) ** (16 / 14)
    assert ntk_base(1e4, 16, length, 4096, alpha) == pytest.approx(want_base)
    want = 1.0 / want_base ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, want, rtol=1e-6, atol=0)
    # The model still runs, and a second length re-derives the base from the original L0.
    prepare_length(model, spec, 2 * L)
    base2 = 1e4 * (alpha * 2 * L / 4096 - (alpha - 1)) ** (16 / 14)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, 1.0 / base2 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16), rtol=1e-6, atol=0)


def test_crd_ntk_fixed_target_length():
    """rope_length fixes L: every input length gets the base of L (the base a CRD-NTK fine-tune trained with)."""
    from ds_msattn.eval.loading import EvalModelSpec, prepare_length

    model = _tiny()  # L0 = 4096, head dim 16, theta 1e4
    spec = EvalModelSpec(rope="crd-ntk", rope_factor=1.0, rope_length=16384)
    want_base = 1e4 * (16384 / 4096) ** (16 / 14)  # alpha 1: b * (L / L0) ** (d / (d - 2))
    want = 1.0 / want_base ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)
    for length in (1000, 4096, 50000):
        prepare_length(model, spec, length)
        torch.testing.assert_close(model.model.rotary_emb.inv_freq, want, rtol=1e-6, atol=0)
    for bad in (dict(rope="crd-ntk", rope_length=0), dict(rope="crd-ntk", rope_length=2.5),
                dict(rope="dynamic", rope_length=8192)):
        with pytest.raises(ValueError, match="rope_length"):
            EvalModelSpec(**bad)


def test_dense_repeat_kv_equals_sdpa():
    """The CUDA dense path (KV heads repeated) is the same maths as transformers' sdpa (checked on CPU)."""
    from ds_msattn.eval.loading import _dense_repeat_kv

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 33, 8, generator=g), torch.randn(2, 2, 33, 8, generator=g), torch.randn(2, 2, 33, 8, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    out, _ = _dense_repeat_kv(None, q, k, v, None, scaling=8**-0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    # One decoded token attends to every key.
    one, _ = _dense_repeat_kv(None, q[:, :, -1:], k, v, None, scaling=8**-0.5)
    torch.testing.assert_close(one, ref.transpose(1, 2)[:, -1:])
