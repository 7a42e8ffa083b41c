"""The tiny recipe with sequence parallelism (SP=2, region sharding and Ulysses) under ZeRO-3 and ZeRO-2
gives the single-process losses (within 1e-4 relative).

Plain SGD without clipping, so that the step-2 loss moves linearly with the step-1 gradient: a gradient
that DeepSpeed averaged wrongly over DP x SP (e.g. SP times too large) changes it visibly, which an Adam
step (scale-invariant) would hide.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from subprocess_env import clean_env, free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "ds_configs" / "recipes" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent
STEPS = 2
SGD = ["--train.optimizer=deepspeed", "--train.grad_clip=0", "--train.lr=0.5", "--train.warmup_steps=0",
       f"--train.max_steps={STEPS}", "--checkpoint.interval=0", "--checkpoint.save_final=false",
       "--train.lr_schedule=constant"]


def _ds_json(tmp: Path, stage: int) -> Path:
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": False},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                              "overlap_comm": False, "contiguous_gradients": True},
        "steps_per_print": 1000000,
    }
    if stage == 3:
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": False}
    path = tmp / f"zero{stage}_sgd.json"
    path.write_text(json.dumps(cfg))
    return path


def _run(cmd: list[str], threads: int) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(threads), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# (mode, ZeRO stage) cases already checked by another test of this session (tests/test_launch_mpi.py runs Ulysses
# under ZeRO-2 through mpirun, tests/test_launch_slurm.py runs
# region sharding under ZeRO-3 through the SLURM sbatch script: the same check, through a real launcher).
COVERED: set[tuple[str, int]] = set()


@functools.cache
def reference_losses() -> tuple[float, ...]:
    """Single-process losses of the SGD run (once per session; shared with tests/test_launch_slurm.py)."""
    tmp = Path(tempfile.mkdtemp(prefix="sp_ref_"))
    _run([sys.executable, "-m", "ds_msattn.train", "--config", str(RECIPE), f"--output_dir={tmp / 'ref'}",
          f"--deepspeed.config={_ds_json(tmp, 3)}", *SGD], threads=2)
    return tuple(_losses(tmp / "ref"))


def check_losses(got: list[float], what: str) -> None:
    reference = reference_losses()
    assert len(got) == len(reference) == STEPS
    assert reference[1] < reference[0] - 1e-3  # the SGD step moved the loss: step 2 sees the gradient
    for step, (a, b) in enumerate(zip(reference, got), 1):
        assert abs(b - a) <= 1e-4 * abs(a), f"{what} step {step}: {b} vs single-process {a}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
@pytest.mark.parametrize("mode", ["region", "ulysses"])
def test_sp2_matches_single_process_losses(tmp_path, mode, stage):
    if (mode, stage) in COVERED:
        pytest.skip(f"{mode} under ZeRO-{stage} already matched through a launcher test (MPI or SLURM)")
    out = tmp_path / f"{mode}{stage}"
    _run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
          "ds_msattn.train", "--config", str(RECIPE), f"--output_dir={out}", f"--deepspeed.config={_ds_json(tmp_path, stage)}",
          "--parallel.sequence_parallel_size=2", f"--parallel.sp_mode={mode}", *SGD], threads=1)
    check_losses(_losses(out), f"{mode} ZeRO-{stage}")
