"""``ds-msattn eval`` end to end on a tiny model directory with a byte-level tokenizer: the JSON holds what the
library functions compute, and the PNGs are written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_tokenizer import save_byte_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from ds_msattn.models import tiny_llama_config

    root = tmp_path_factory.mktemp("tiny")
    save_byte_tokenizer(root)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(root)
    text = root / "doc.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 12)
    return root


def test_ppl_cli_matches_library(tiny_dir, tmp_path):
    from ds_msattn.eval.cli import main
    from ds_msattn.eval.ppl import perplexity
    from ds_msattn.models import load_model, load_tokenizer

    out = tmp_path / "ppl.json"
    assert main(["ppl", "--model", str(tiny_dir), "--text-file", str(tiny_dir / "doc.txt"), "--context", "64,128",
                 "--output", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert rep["command"].startswith("ds-msattn eval ppl")
    model = load_model(str(tiny_dir)).eval()
    ids = torch.tensor(load_tokenizer(str(tiny_dir))((tiny_dir / "doc.txt").read_text())["input_ids"])
    for row in rep["results"]:
        want = perplexity(model, [ids], row["context"], log=lambda *_: None)
        assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
        assert row["windows"] == ids.shape[0] // row["context"] and math.isfinite(row["ppl"])


def test_passkey_cli(tiny_dir, tmp_path):
    from ds_msattn.eval.cli import main

    out = tmp_path / "pk.json"
    assert main(["passkey", "--model", str(tiny_dir), "--lengths", "200,260", "--depths", "0,1", "--trials", "1",
                 "--attn", "ms_attention", "--region-size", "4", "--top-k", "4", "--merge", "2",
                 "--rope", "crd-ntk", "--output", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(rep["accuracy"]) == {"200", "260"} and len(rep["trials"]) == 4
    for t in rep["trials"]:  # the record is consistent with the scorer
        assert t["passed"] == (t["found"] == t["key"])


def test_recursive_cli(tiny_dir, tmp_path):
    from ds_msattn.eval.cli import main

    out = tmp_path / "rec.json"
    assert main(["recursive", "--model", str(tiny_dir), "--text-file", str(tiny_dir / "doc.txt"), "--region-size", "4",
                 "--top-k", "4", "--merge", "2", "--chunk", "64", "--window-regions", "4", "--scales", "1,2",
                 "--summary-slots", "4", "--local-regions", "1", "--new-tokens", "3", "--output", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["tokens"] > 500 and len(rep["new_tokens"]) == 3 and math.isfinite(rep["ppl"])


def test_cli_rejects_bad_arguments(tiny_dir, tmp_path):
    from ds_msattn.eval.cli import main

    with pytest.raises(SystemExit):
        main(["ppl", "--model", str(tiny_dir), "--context", "64", "--output", str(tmp_path / "x.json")])  # no source
    with pytest.raises(ValueError, match="rope_factor"):
        main(["ppl", "--model", str(tiny_dir), "--text-file", str(tiny_dir / "doc.txt"), "--context", "64",
              "--rope", "dynamic", "--rope-factor", "0.5", "--output", str(tmp_path / "x.json")])


def test_bfloat16_model_tracks_float32(tiny_dir, tmp_path):
    """--dtype bfloat16 loads the weights in bf16: the perplexity stays within 1% of fp32's; other dtypes are refused."""
    from ds_msattn.eval.cli import main
    from ds_msattn.eval.loading import EvalModelSpec

    ppl = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["ppl", "--model", str(tiny_dir), "--text-file", str(tiny_dir / "doc.txt"), "--context", "128",
                     "--attn", "ms_attention", "--region-size", "4", "--top-k", "4", "--merge", "2", "--dtype", dtype,
                     "--output", str(out), "--quiet"]) == 0
        rep = json.loads(out.read_text())
        assert ("bfloat16" in rep["setup"]) == (dtype == "bfloat16")
        ppl[dtype] = rep["results"][0]["ppl"]
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=1e-2) and ppl["bfloat16"] != ppl["float32"]
    with pytest.raises(ValueError, match="dtype"):
        EvalModelSpec(dtype="float16")


def test_adapter_is_merged(tiny_dir, tmp_path):
    """--adapter: a peft adapter (LoRA on k/o plus saved embeddings and norms) gives the peft model's outputs."""
    from peft import LoraConfig, get_peft_model

    from ds_msattn.eval.loading import EvalModelSpec, load_eval_model
    from ds_msattn.models import load_model

    base = load_model(str(tiny_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"],
                                                 modules_to_save=["embed_tokens", "norm"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
        got = load_eval_model(EvalModelSpec(model=str(tiny_dir), adapter=str(tmp_path / "adapter")))(ids).logits
        plain = load_model(str(tiny_dir)).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter changed something


def test_passkey_cli_corpus_haystack_diagnose_and_resume(tiny_dir, tmp_path, monkeypatch):
    from ds_msattn.eval import passkey
    from ds_msattn.eval.cli import main

    trials = tmp_path / "trials.jsonl"
    argv = ["passkey", "--model", str(tiny_dir), "--lengths", "400", "--depths", "0.2,0.8", "--trials", "1",
            "--attn", "ms_attention", "--region-size", "4", "--top-k", "4", "--merge", "2", "--haystack", "corpus",
            "--far-positions", "compact", "--score", "position_free", "--diagnose", "--trials-file", str(trials),
            "--output", str(tmp_path / "pk.json"), "--quiet"]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "pk.json").read_text())
    assert "far_positions=compact" in rep["setup"] and rep["ms_attention"]["score"] == "position_free"
    assert len(trials.read_text().splitlines()) == 2 and set(rep["needle_recall"]) == {"400"}
    for t in rep["trials"]:
        assert t["haystack"] == "corpus" and len(t["haystack_works"]) == passkey.HELD_OUT_WORKS
        assert 0.0 <= t["needle"]["prefill_recall"] <= 1.0 and len(t["needle"]["per_layer_prefill"]) == 2
    # A rerun finds every trial in the file, runs none again, and its progress counts none of them as to run.
    monkeypatch.setattr(passkey, "greedy_generate", lambda *a, **k: pytest.fail("trial rerun"))
    from ds_msattn import progress

    totals = []
    real_skip = progress.LayerProgress.skip_unit
    monkeypatch.setattr(progress.LayerProgress, "skip_unit",
                        lambda self: (real_skip(self), totals.append(self.bar.total)))
    assert main(argv) == 0
    assert totals == [1, 0]
    assert json.loads((tmp_path / "pk.json").read_text())["trials"] == rep["trials"]


def test_the_model_label_names_the_options_the_model_runs():
    """Unset options show the model defaults (what runs), window and group only where they apply."""
    from ds_msattn.attention.options import MODEL_OPTIONS
    from ds_msattn.eval.loading import EvalModelSpec

    label = EvalModelSpec(attention="ms_attention").describe()
    assert (f"far_positions={MODEL_OPTIONS['far_positions']},score={MODEL_OPTIONS['score']},"
            f"select_per={MODEL_OPTIONS['select_per']})") in label and "far_window" not in label
    grouped = dict(region_size=16, top_k=64, merge=16, far_positions="grouped", far_window=2048, far_group=8,
                   score="rope")
    assert "far_positions=grouped,far_window=2048,far_group=8,score=rope," in EvalModelSpec(
        attention="ms_attention", ms_params=grouped).describe()
    assert EvalModelSpec(attention="sdpa").describe() == "sdpa, rope none"
