"""launch/gpu_check.sh: the CPU fall-back (one line, exit 0) and, with a stub GPU, the control flow of its phases.

No GPU is needed or used: the stub is an ``nvidia-smi`` that lists one GPU and a ``python`` that answers the
script's environment probes, prints a pytest summary, writes the training metrics a real run writes, and hands
everything else (the script's own summary code) to the real interpreter. What runs for real is the bash: phase
order, time caps and the budget, exit status, and the Markdown summaries.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_check.sh"

STUB_PYTHON = """#!/usr/bin/env bash
# stub interpreter for tests/test_gpu_check.py
case "$1 $2" in
  "-c "*) exit 0 ;;  # torch.cuda.is_available(), import ds_msattn.kernels
  "-m pytest") echo "3 passed in 0.10s"; exit 0 ;;
  "-m ds_msattn.train")
    for a in "$@"; do case "$a" in --output_dir=*) out=${a#--output_dir=} ;; --attention.implementation=*) impl=${a#*=} ;; esac; done
    [ "$impl" = sdpa ] && [ -n "${STUB_TRAIN_FAIL:-}" ] && { echo "stub: sdpa run broke" >&2; exit 3; }
    t=2.0; [ "$impl" = sdpa ] && t=6.0
    mkdir -p "$out"
    for step in 1 2; do
      echo "{\\"step\\": $step, \\"step_time_s\\": $t, \\"tokens_per_s\\": 16384.0, \\"peak_memory_mib\\": 9000.0, \\"loss\\": 3.5}" >>"$out/metrics.jsonl"
    done
    exit 0 ;;
  "benchmarks/kernels.py "*) echo "stub kernels.py $*"; exit 0 ;;
  "- ")  # the script's probes read from stdin: the device's short name and the versions line
    if grep -q re.split; then echo stubgpu; else echo "GPU Stub H100, torch stub"; fi
    exit 0 ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def _run(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTHON", "GPU_TAG")}
    env.update(extra)
    return env


def test_cpu_fallback_says_so_in_one_line_and_exits_0():
    out = _run([], _env(CUDA_VISIBLE_DEVICES=""))  # hides any GPU, so this is the fall-back everywhere
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    assert lines[0].startswith("gpu_check: no CUDA GPU (CUDA_VISIBLE_DEVICES hides every GPU)")
    assert "measured nothing" in lines[0]
    assert out.stderr == ""


def test_bad_arguments_exit_2():
    assert _run(["--bogus"], _env()).returncode == 2
    bad = _run(["--only", "tests,nope"], _env(CUDA_VISIBLE_DEVICES=""))
    assert bad.returncode == 2 and "unknown phase nope" in bad.stderr


@pytest.fixture
def stub_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/usr/bin/env bash\n[ "$1" = -L ] && echo "GPU 0: NVIDIA Stub H100 (UUID: GPU-0)"\n'
                   'case "$*" in *driver_version*) echo 999.1 ;; esac\nexit 0\n')
    py = bin_dir / "python"
    py.write_text(STUB_PYTHON)
    for f in (smi, py):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    results = tmp_path / "results"
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(py), REAL_PYTHON=sys.executable,
                GPU_CHECK_RESULTS=str(results)), results


def test_gpu_path_runs_every_phase_and_writes_summaries(stub_gpu):
    env, results = stub_gpu
    out = _run([], env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all phases passed" in out.stdout
    summary = (results / "gpu_check_stubgpu.md").read_text()
    for phase in ("tests", "select", "kernels", "train ms_attention", "train sdpa"):
        assert f"| {phase} | passed |" in summary, summary
    assert "3 passed in 0.10s" in summary
    assert "GPU Stub H100, torch stub, driver 999.1" in summary
    train = (results / "train_smollm2_stubgpu.md").read_text()
    assert "sdpa / MS step time = 3.00x" in train
    assert len((results / "train_smollm2_stubgpu.csv").read_text().splitlines()) == 5  # header + 2 steps x 2
    assert not (results / "train_smollm2_stubgpu_runs").exists()
    log = (results / "gpu_check_stubgpu.log").read_text()
    assert "--lengths 16384,32768,65536,131072" in log and "--mode select" in log
    assert "--data.seq_len=32768" in log and "--deepspeed.config=ds_configs/zero3_offload.json" in log


def test_gpu_path_failed_phase_exits_1_and_others_still_run(stub_gpu):
    env, results = stub_gpu
    out = _run(["--only", "tests,train"], dict(env, STUB_TRAIN_FAIL="1"))
    assert out.returncode == 1, out.stdout + out.stderr
    summary = (results / "gpu_check_stubgpu.md").read_text()
    assert "| train ms_attention | passed |" in summary and "| train sdpa | FAILED (exit 3) |" in summary
    assert "| kernels |" not in summary
    rows = (results / "train_smollm2_stubgpu.csv").read_text().splitlines()
    assert len(rows) == 3  # header + the MS run's two steps


def test_gpu_path_budget_spent_skips_phases(stub_gpu):
    env, results = stub_gpu
    out = _run(["--only", "select"], dict(env, GPU_CHECK_BUDGET_S="5"))
    assert out.returncode == 1
    assert "| select | skipped (budget of 5 s spent) |" in (results / "gpu_check_stubgpu.md").read_text()
