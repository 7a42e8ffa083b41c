"""Progress of long work (ds_msattn/progress.py): layer passes inside a training step, evaluation units per layer."""

from __future__ import annotations

import io
import itertools

import torch
from transformers import AutoModelForCausalLM

from ds_msattn.models import tiny_llama_config
from ds_msattn.progress import LayerProgress, LineProgress, StepProgress


def tiny_model(layers: int = 3):
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=layers), attn_implementation="sdpa")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def test_step_progress_counts_forward_and_backward_passes_and_estimates_from_the_first_step():
    model, clock, out = tiny_model(3), itertools.count(), io.StringIO()
    progress = StepProgress(model.model.layers, micro_batches=1, total_steps=2, interval=1, stream=out,
                            clock=lambda: float(next(clock)))
    for step in range(2):
        progress.begin(step)
        ids = torch.randint(0, 256, (1, 32))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # recomputation is not counted
        assert len(progress.times) == 6
        progress.end()
    progress.close()
    lines = out.getvalue().splitlines()
    assert "train: step 1/2: layer pass 1/6 (forward)" in lines[0] and "rough, first step" in lines[0]
    second = [ln for ln in lines if ln.startswith("train: step 2/2: layer pass")]
    assert len(second) == 6 and all("left in this step" in ln and "rough" not in ln for ln in second)
    assert any("took" in ln and "1 more step" in ln for ln in lines)


def test_short_steps_print_nothing():
    model, out = tiny_model(2), io.StringIO()
    progress = StepProgress(model.model.layers, micro_batches=1, total_steps=1, interval=3600, stream=out)
    progress.begin(0)
    ids = torch.randint(0, 256, (1, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    progress.end()
    progress.close()
    assert out.getvalue() == ""


def test_layer_progress_counts_a_chunked_prefill_as_one_unit():
    """A window read in chunks (H2O's steps of 8 tokens here) advances by the tokens read, not by the passes."""
    model, out = tiny_model(2).eval(), io.StringIO()
    bar = LineProgress(1, "ppl at 32", "windows", interval=3600, stream=out)
    ticker = LayerProgress(bar, model.model.layers, unit_tokens=32)
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.randint(0, 256, (1, 8)))
    assert abs(bar.n - 0.75) < 1e-9
    ticker.set_unit_tokens(16)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 4)))
    ticker.close()
    assert abs(bar.n - 1.0) < 1e-9


def test_layer_progress_advances_per_prefill_layer_and_ignores_decoding():
    model, clock, out = tiny_model(4).eval(), itertools.count(), io.StringIO()
    bar = LineProgress(2, "ppl at 32", "windows", interval=1, stream=out, clock=lambda: float(next(clock)))
    ticker = LayerProgress(bar, model.model.layers)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=torch.randint(0, 256, (1, 32)))
        model(input_ids=torch.randint(0, 256, (1, 1)))  # one token: a decoding step, not counted
    ticker.close()
    assert abs(bar.n - 2) < 1e-9
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ppl at 32: 0.2/2 windows") and "left" in lines[0]  # a quarter: 1 of 4 layers
    assert lines[-1].startswith("ppl at 32: 2/2 windows") and "left" not in lines[-1]


def test_a_skipped_unit_leaves_the_total_and_the_estimate():
    """Resumed passkey trials need no work: the line counts and estimates only the units that run."""
    model, clock, out = tiny_model(2).eval(), itertools.count(), io.StringIO()
    bar = LineProgress(5, "passkey at 32", "trials", interval=1, stream=out, clock=lambda: float(next(clock)))
    ticker = LayerProgress(bar, model.model.layers, unit_tokens=32)
    for _ in range(3):
        ticker.skip_unit()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 32)))
    ticker.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("passkey at 32: 0.5/2 trials") and "left" in lines[0]
    assert lines[-1].startswith("passkey at 32: 1/2 trials")


def test_each_passkey_length_is_counted_and_estimated_on_a_bar_of_its_own():
    """A 64K trial costs many 8K ones: the time left of a length is estimated from that length's trials only."""
    model, clock, out = tiny_model(2).eval(), itertools.count(), io.StringIO()
    ticker = LayerProgress(None, model.model.layers)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 8)))  # before the first bar: nothing to count
        bars = []
        for n in (16, 32):
            bars.append(LineProgress(2, f"passkey at {n}", "trials", interval=1, stream=out,
                                     clock=lambda: float(next(clock))))
            ticker.next_bar(bars[-1], unit_tokens=n)
            for _ in range(2):
                model(input_ids=torch.randint(0, 256, (1, n)))
    ticker.close()
    assert [b.n for b in bars] == [2, 2]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("passkey at 16: 0.5/2 trials") and "left" in lines[0]
    second = [line for line in lines if line.startswith("passkey at 32")]
    assert second[0].startswith("passkey at 32: 0.5/2 trials") and second[-1].startswith("passkey at 32: 2/2 trials")
