"""The unmodified SLURM sbatch script runs the tiny recipe with 2 tasks (SP=2, region sharding, ZeRO-3, the
SGD set-up of tests/test_sp_train.py) on a single-node SLURM started here on 127.0.0.1, and gives the
single-process losses of that test (shared, computed once per session).

Set-up installs Debian ``slurm-wlm`` and ``munge`` with apt when they are missing (skipped, with the reason,
only when apt cannot install them), starts munged, slurmctld and slurmd from a private slurm.conf, and stops
them afterwards (docs/facts.md lists the settings that work here).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocess_env import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "ds_configs" / "recipes" / "tiny.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_sp_train  # noqa: E402  (the shared reference and SGD settings)


def _ensure_installed() -> None:
    if all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("slurm-wlm/munge are missing and apt-get cannot be run as root here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env,
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"apt-get could not install slurm-wlm and munge (unreachable?): {proc.stderr[-500:]}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node SLURM; yields the environment that points its commands at our slurm.conf."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root")
    _ensure_installed()
    tmp = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    mem = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) // 1024 // 2
    for d in ("state", "spool"):
        (tmp / d).mkdir()
    conf = tmp / "slurm.conf"
    conf.write_text(f"""ClusterName=dsmsattn
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={tmp / 'state'}
SlurmdSpoolDir={tmp / 'spool'}
SlurmctldPidFile={tmp / 'slurmctld.pid'}
SlurmdPidFile={tmp / 'slurmd.pid'}
SlurmctldLogFile={tmp / 'slurmctld.log'}
SlurmdLogFile={tmp / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    procs = []
    try:
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        running = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0
        if not running:  # ours to stop afterwards
            procs.append(subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "-F"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if state.strip() in ("idle", "mix", "alloc"):
                break
            time.sleep(1)
        else:
            logs = "".join((tmp / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log") if (tmp / f).exists())
            pytest.fail(f"SLURM node never became idle (sinfo: {state!r})\n{logs}")
        yield env
    finally:
        for p in reversed(procs):  # slurmd, slurmctld, munged: only the processes started here
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_sbatch_srun_two_tasks_sequence_parallel_matches_single_process(slurm, tmp_path):
    out = tmp_path / "sp2"
    ds_json = test_sp_train._ds_json(tmp_path, 3)
    log = tmp_path / "job.out"
    job_env = dict(slurm, OMP_NUM_THREADS="1", DS_MSATTN_ROOT=str(ROOT), PYTHONUNBUFFERED="1")
    job_env = {k: v for k, v in job_env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run(
        ["sbatch", "--wait", "-N", "1", "-n", "2", "-o", str(log), str(ROOT / "launch" / "slurm_srun.sbatch"),
         "--config", str(RECIPE), f"--output_dir={out}", f"--deepspeed.config={ds_json}",
         "--parallel.sequence_parallel_size=2", "--parallel.sp_mode=region", *test_sp_train.SGD],
        cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=600)
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"sbatch failed: {proc.stdout}\n{proc.stderr}\n--- job output\n{text[-5000:]}"
    test_sp_train.check_losses(test_sp_train._losses(out), "SLURM sbatch, region ZeRO-3")
    test_sp_train.COVERED.add(("region", 3))
