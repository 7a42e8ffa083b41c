"""Quiet by default, verbose on request: the one place that decides what the project's entry points print.

Every entry point (``ds-msattn ...``, ``python -m ds_msattn.train``, ``python -m ds_msattn.eval.cli``) calls
:func:`setup_logging` first. By default it

- sets the libraries' log levels through their own settings: DeepSpeed's logger, transformers' verbosity and
  advisory warnings, the progress bars of huggingface_hub, transformers and datasets (``HF_HUB_DISABLE_PROGRESS_BARS``,
  ``HF_DATASETS_DISABLE_PROGRESS_BARS``), and ``DS_ACCELERATOR=cpu`` on a machine without CUDA (DeepSpeed then
  skips its "unable to detect an accelerator" warning);
- hides three FutureWarnings raised inside DeepSpeed and peft about calls that this project does not make itself
  (``torch.distributed.all_gather_into_tensor``, ``reduce_scatter_tensor``, ``is_gradient_checkpointing``);
- lets one rank speak: ranks other than 0 show errors only.

Environment variables are set with ``setdefault`` (a user's own choice wins) and are inherited by child processes
(the ranks a launcher starts). ``--verbose`` on any command, or ``DS_MSATTN_VERBOSE=1``, leaves every library at its
own defaults and makes user errors print their traceback.

:func:`run_command` turns a user's mistake (``ValueError``, a missing file) into one line on stderr and exit code 2;
other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable

VERBOSE_ENV = "DS_MSATTN_VERBOSE"
VERBOSE_FLAG = "--verbose"

# FutureWarnings raised inside the libraries (the project's own code uses the successors), matched by message.
LIBRARY_DEPRECATIONS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
)

# Exceptions that mean "the input is wrong", not "the code is wrong".
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0").lower() not in ("", "0", "false", "no")


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose`` (anywhere before a ``--``) and whether it was there."""
    out, found, passthrough = [], False, False
    for arg in argv:
        if arg == "--":
            passthrough = True
        if not passthrough and arg == VERBOSE_FLAG:
            found = True
            continue
        out.append(arg)
    return out, found


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 when there is none)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"])
    return 0


def _cuda_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        return False


def setup_logging(verbose: bool | None = None) -> bool:
    """Configure the libraries' output for this process (see the module docstring). Returns whether verbose."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # children (launcher ranks) inherit it
    verbose = is_verbose()
    if verbose:
        return True
    quiet_rank = process_rank() != 0
    env = os.environ
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in env and not _cuda_visible():
        env["DS_ACCELERATOR"] = "cpu"
    for pattern in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    if quiet_rank:
        warnings.simplefilter("ignore")
    # Libraries imported before this call read their environment already: set them through their APIs too.
    level = logging.ERROR if quiet_rank else logging.WARNING
    logging.getLogger("DeepSpeed").setLevel(level)
    for handler in logging.getLogger("DeepSpeed").handlers:
        handler.setLevel(level)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    return False


@contextlib.contextmanager
def captured_stdout():
    """Hold back what a library prints on stdout inside the block (DeepSpeed prints "... built successfully" each
    time it loads its CPU communication op); replayed when the block fails or when verbose."""
    if is_verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stdout.write(buffer.getvalue())
        raise


def progress_enabled() -> bool:
    """Whether this process shows progress (rank 0 only)."""
    return process_rank() == 0


def say(msg: str) -> None:
    """One line of progress on rank 0 (stderr, flushed), so that stdout stays the command's result."""
    if progress_enabled():
        print(msg, file=sys.stderr, flush=True)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (what is wrong, where help is) instead of the usage block; exit code 2.

    Subparsers made with ``add_subparsers`` inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_error(prog: str, err: BaseException) -> str:
    """The one line printed for a user's mistake."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    return f"{prog}: error: {text.splitlines()[0]}"


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run ``main(argv)`` with logging set up; a user error becomes one line on stderr and exit code 2.

    ``--verbose`` is removed from argv (and turns on full logs and tracebacks). Other exceptions propagate
    (a bug: Python prints the traceback, exit code 1).
    """
    argv, flag = pop_verbose(list(argv))
    verbose = setup_logging(verbose=flag or None)
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else f" (add {VERBOSE_FLAG} for the traceback)"
        print(user_error(prog, err) + hint, file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
