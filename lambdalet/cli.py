"""The ``lambdalet`` command: one entry point, each subcommand implemented by the component that owns it.

Subcommand modules are imported lazily so that ``lambdalet agent`` (which runs inside every execution
environment) never pays for importing the gateway or the operator.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module exposing ``main(argv: list[str]) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("lambdalet_agent.cli", "run one execution environment (like AWS's runtime interface emulator)"),
    "up": ("lambdalet_gateway.cli", "run the embedded platform: gateway + local backend"),
    "invoke": ("lambdalet_gateway.cli", "invoke a function through a running gateway"),
    "ls": ("lambdalet_gateway.cli", "list the functions a running gateway serves"),
    "logs": ("lambdalet_gateway.cli", "show a function's logs from a running gateway"),
    "crd": ("lambdalet.crd", "print the Function CustomResourceDefinition generated from the spec model"),
}


def usage() -> str:
    lines = ["usage: lambdalet <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    command = args[0]
    if command not in SUBCOMMANDS:
        print(f"lambdalet: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
