"""``python -m lambdalet_agent [flags] [-- COMMAND ...]``: the same as ``lambdalet agent ...``."""

import sys

from lambdalet_agent.cli import main

raise SystemExit(main(["agent", *sys.argv[1:]]))
