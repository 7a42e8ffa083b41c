"""The ``ds-msattn`` command: subcommands dispatch lazily to their modules' ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("ds_msattn.train", "fine-tune a model (DeepSpeed; see ds_configs/recipes/)"),
    "eval": ("ds_msattn.eval.cli", "evaluate: passkey retrieval, perplexity, recursive long-input inference"),
    "plan": ("ds_msattn.planner", "memory planner: will this model, at this length, fit on these GPUs?"),
    "demo": ("ds_msattn.demo", "MS attention vs dense on the real model: perplexity and speed"),
}


def usage() -> str:
    lines = ["usage: ds-msattn COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ds-msattn: unknown command {name!r}; choose from {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
