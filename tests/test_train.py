"""The tiny recipe end to end with DeepSpeed ZeRO-3 offload on CPU (gloo): 1 rank vs 2 ranks, exact resume.

Runs are real processes (the trainer ends with os._exit). One single-process run of 4 steps (micro batch 2,
checkpoint every 2 steps) is the reference; a fresh process resumed from its step-2 checkpoint must reproduce
steps 3-4 exactly, and 2 data-parallel ranks (micro batch 1 each: the same global batch) must match it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_env import clean_env, free_port, shm_left

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "ds_configs" / "recipes" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent


def _run(cmd: list[str], threads: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(threads), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# alpha doubles every 2 steps here, so the resumed run must rebuild the rotary frequencies for alpha 4
COMMON = ["--train.max_steps=4", "--checkpoint.interval=2", "--checkpoint.keep_last=2", "--positions.interval=2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "ref"
    _run([sys.executable, "-m", "ds_msattn.train", "--config", str(RECIPE), f"--output_dir={out}",
          "--train.micro_batch_size=2", "--train.profile_step=3", *COMMON])
    return out


@pytest.mark.slow
def test_single_process_run_writes_metrics_checkpoints_config_and_tensorboard(reference_run):
    rows = _metrics(reference_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "peak_memory_mib", "alpha", "shift"} <= set(r)
        assert r["tokens"] == 2 * 1024 and r["tokens_per_s"] > 0
    assert 4.0 < rows[0]["loss"] < 7.0 and rows[-1]["loss"] < rows[0]["loss"]  # ln(320) = 5.77 at random init
    assert [r["alpha"] for r in rows] == [2.0, 2.0, 4.0, 4.0]
    ckpts = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"]  # no leftover temp dirs
    assert (reference_run / "checkpoints" / "step_00000004" / "trainer_state.json").is_file()
    adapter = json.loads((reference_run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj"]
    assert (reference_run / "adapter" / "adapter_model.safetensors").is_file()
    resolved = (reference_run / "config.yaml").read_text()
    assert "micro_batch_size: 2" in resolved and "max_steps: 4" in resolved
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference_run / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in rows])
    assert "train/tokens_per_s" in acc.Tags()["scalars"] and "train/peak_memory_mib" in acc.Tags()["scalars"]
    # train.profile_step=3: that step's operator table, nothing for the others (the resumed run, which does not
    # profile, reproduces these losses bit for bit: profiling changes no arithmetic)
    assert sorted(p.name for p in reference_run.glob("profile_step_*")) == ["profile_step_3.json", "profile_step_3.txt"]
    table = (reference_run / "profile_step_3.txt").read_text()
    assert "by self CPU time" in table and "aten::" in table and "MSAttentionFunction" in table
    ops = json.loads((reference_run / "profile_step_3.json").read_text())["ops"]
    assert "MSAttentionFunction" in {o["name"] for o in ops} and all(o["calls"] > 0 for o in ops)
    assert [o["self_s"] for o in ops] == sorted((o["self_s"] for o in ops), reverse=True)


@pytest.mark.slow
def test_resume_auto_reproduces_the_uninterrupted_losses_exactly(reference_run, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    # the state an interrupted run leaves: its checkpoint at step 2 and the metrics it wrote up to step 3
    shutil.copytree(reference_run / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "checkpoints" / ".tmp-step_00000004").mkdir()  # a half-written checkpoint must be ignored
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(reference_run)[:3]))
    _run([str(VENV_BIN / "ds-msattn"), "train", "--config", str(RECIPE), f"--output_dir={out}",
          "--train.micro_batch_size=2", "--resume=auto", *COMMON])
    ref, got = _metrics(reference_run), _metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bit-exact
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]


@pytest.mark.slow
def test_two_ranks_match_the_single_process_run(reference_run, tmp_path):
    out = tmp_path / "dp2"
    port = free_port()
    _run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module",
          "ds_msattn.train", "--config", str(RECIPE), f"--output_dir={out}", "--train.micro_batch_size=1",
          "--train.max_steps=2", "--checkpoint.save_final=false", "--positions.interval=2"], threads=1)
    # both ranks unlinked the shared-memory all-reduce segment DeepSpeed's CPU comm op made (parallel/exit.py)
    left = shm_left(port, 2)
    assert not left, f"left in /dev/shm: {left}"
    ref, got = _metrics(reference_run)[:2], _metrics(out)
    assert [r["step"] for r in got] == [1, 2]
    assert [r["tokens"] for r in got] == [2048, 2048]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)


def test_bad_config_exits_with_an_error_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ds_msattn.train", "--config", str(RECIPE),
                           f"--output_dir={tmp_path}", "--attention.merge=100"], cwd=ROOT, env=clean_env(2),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "attention.merge" in proc.stderr
