"""The ``ds-msattn`` command: subcommands dispatch lazily to their modules' ``main(argv) -> int``.

``--verbose`` (anywhere, or ``DS_MSATTN_VERBOSE=1``) shows the libraries' full logs and the traceback of a user
error; by default a user's mistake prints one line and exits with code 2 (``ds_msattn.logs``).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("ds_msattn.train", "fine-tune a model (DeepSpeed; see ds_configs/recipes/)"),
    "eval": ("ds_msattn.eval.cli", "evaluate: passkey retrieval, perplexity, recursive long-input inference"),
    "plan": ("ds_msattn.planner", "memory planner: will this model, at this length, fit on these GPUs?"),
    "demo": ("ds_msattn.demo", "MS attention vs dense on the real model: perplexity and speed"),
    "esa-calibrate": ("ds_msattn.attention.esa_calibrate", "fit ESA's low-dimensional query/key projections"),
}


def usage() -> str:
    lines = ["usage: ds-msattn [--verbose] COMMAND [ARGS...]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "--verbose (or DS_MSATTN_VERBOSE=1): full library logs, tracebacks for errors",
              "documentation: README.md, docs/design.md, docs/architecture.md"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .logs import pop_verbose, run_command, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, verbose = pop_verbose(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ds-msattn: error: unknown command {name!r}; choose from {', '.join(COMMANDS)} "
              "(ds-msattn --help lists them)", file=sys.stderr)
        return 2
    setup_logging(verbose=verbose or None)  # before the command's module imports its libraries
    module = importlib.import_module(COMMANDS[name][0])
    return run_command(f"ds-msattn {name}", module.main, rest + (["--verbose"] if verbose else []))


if __name__ == "__main__":
    sys.exit(main())
