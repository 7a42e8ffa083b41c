"""benchmarks/train_smollm2.py's profile report: the side-by-side table and the bounds derived from it."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_smollm2", ROOT / "benchmarks" / "train_smollm2.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
PROFILES = {  # self seconds per operator, as train.profile_step writes them
    "sdpa": {"step_s": 281.0, "ops": {FLASH + "_backward": 120.0, FLASH: 80.0, "aten::mm": 70.0, "aten::mul": 10.0}},
    "ms_attention": {"step_s": 111.0, "ops": {"aten::mm": 70.0, "aten::mul": 14.0, FLASH + "_backward": 12.0,
                                              FLASH: 8.0, "aten::topk": 6.0}},
}


def _write(tmp_path):
    for impl, p in PROFILES.items():
        ops = [{"name": n, "calls": 1, "self_s": s, "total_s": s} for n, s in sorted(p["ops"].items(), key=lambda x: -x[1])]
        (tmp_path / f"train_smollm2_profile_{impl}.json").write_text(json.dumps({"step_s": p["step_s"], "ops": ops}))


def test_profile_table_and_bounds(tmp_path, monkeypatch):
    _write(tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    lines = bench.profile_table(["ms_attention", "sdpa"], top=2)
    table = {ln.split(" | ")[0].strip("| `"): ln for ln in lines if ln.startswith("| ")}
    assert table["aten::mm"].endswith("| 70.0 | 70.0 |")
    # rows: the top 2 of each run (mm, mul; both flash kernels); the rest is topk for MS, nothing for sdpa
    assert table["everything else"] == "| everything else | 6.0 | 0.0 |"
    assert "110.0 (111.0) | 280.0 (281.0)" in table["all operators (profiled step: wall time)"]
    text = lines[-1]
    # shared work = sdpa's step without its kernels: 280 - 200 = 80; MS beyond it and its kernels: 110 - 80 - 20 = 10
    assert "200.0 s for sdpa, 20.0 s for ms_attention (10.0x less)" in text and "80.0 s" in text and "10.0 s beyond" in text
    assert "2.81x if ms_attention had no work beside its kernels" in text  # 281 / (80 + 20)
    assert "3.51x if attention were free" in text and "measured 2.53x" in text  # 281 / 80, 281 / 111
