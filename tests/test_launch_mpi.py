"""The unmodified MPI launch script (launch/mpi.sh: mpirun + DeepSpeed's MPI discovery) runs the tiny recipe on 2
ranks with SP=2 (Ulysses under ZeRO-2, the SGD set-up of tests/test_sp_train.py) and gives the single-process
losses of that test; the job must also exit 0 (MPI finalised before the trainer's os._exit).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_env import clean_env

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "ds_configs" / "recipes" / "tiny.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_sp_train  # noqa: E402  (the shared reference and SGD settings)


@pytest.mark.slow
def test_mpirun_two_ranks_sequence_parallel_matches_single_process(tmp_path):
    if not (ROOT / ".venv" / "bin" / "mpirun").exists():
        pytest.skip("no .venv/bin/mpirun: install the 'mpi' extra (launch/setup_env.sh does)")
    out = tmp_path / "mpi"
    env = dict(clean_env(1), NPROC="2")
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "mpi.sh"), "--config", str(RECIPE), f"--output_dir={out}",
         f"--deepspeed.config={test_sp_train._ds_json(tmp_path, 2)}", "--parallel.sequence_parallel_size=2",
         "--parallel.sp_mode=ulysses", *test_sp_train.SGD],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mpi.sh failed\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    test_sp_train.check_losses(test_sp_train._losses(out), "mpirun, Ulysses ZeRO-2")
    test_sp_train.COVERED.add(("ulysses", 2))
