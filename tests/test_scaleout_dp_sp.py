"""Data parallel and sequence parallel at once: 4 gloo ranks as DP 2 x SP 2 give the single-process losses.

Both sp_modes (region sharding, Ulysses) under ZeRO-3 and ZeRO-2, each within 1e-4 relative of one process
that trains on the same global batch (2 sequences of 1024 tokens per step). Plain SGD without clipping (as in
tests/test_sp_train.py): a gradient averaged wrongly over DP x SP changes the step-2 loss visibly. The four
configurations run one after another in a single 4-rank launch (tests/scaleout_runs.py) to pay the start-up once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_env import clean_env, free_port
from test_sp_train import RECIPE, SGD, _ds_json, _losses

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CASES = [("region", 3), ("region", 2), ("ulysses", 3), ("ulysses", 2)]


def _run(cmd: list[str], threads: int, timeout: int = 600) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(threads), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_dp2_x_sp2_matches_the_single_process_losses(tmp_path):
    ref_out = tmp_path / "ref"
    _run([sys.executable, "-m", "ds_msattn.train", "--config", str(RECIPE), f"--output_dir={ref_out}",
          f"--deepspeed.config={_ds_json(tmp_path, 3)}", "--train.micro_batch_size=2", *SGD], threads=2)
    reference = _losses(ref_out)
    assert reference[1] < reference[0] - 1e-3  # the SGD step moved the loss: step 2 sees the gradient

    runs = [[str(RECIPE), [f"--output_dir={tmp_path / f'{mode}{stage}'}", f"--deepspeed.config={_ds_json(tmp_path, stage)}",
                           "--parallel.sequence_parallel_size=2", f"--parallel.sp_mode={mode}",
                           "--train.micro_batch_size=1", *SGD]] for mode, stage in CASES]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    _run([str(VENV_BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port()),
          str(ROOT / "tests" / "scaleout_runs.py"), str(tmp_path / "runs.json")], threads=1)
    for mode, stage in CASES:
        rows = [json.loads(line) for line in (tmp_path / f"{mode}{stage}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["tokens"] for r in rows] == [2 * 1024] * len(reference)  # DP 2: two sequences per step
        got = [r["loss"] for r in rows]
        for step, (a, b) in enumerate(zip(reference, got, strict=True), 1):
            assert abs(b - a) <= 1e-4 * abs(a), f"{mode} ZeRO-{stage} step {step}: {b} vs single-process {a}"
