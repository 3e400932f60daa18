"""Runtime discovery: which command starts the bootstrap of a runtime id.

Every ``<runtimes dir>/<lang>/runtime.json`` declares
``{"runtimes": [...], "command": [...], "requires": [...]}``; in ``command``, ``{dir}`` is that
runtime's folder, ``{python}`` the agent's own interpreter and ``{code}`` the code directory. The
runtimes dir is ``$LAMBDALET_RUNTIMES_DIR``, by default ``runtime-images/`` (two levels above this
package). ``provided.al2023`` and ``provided.al2`` run ``{code}/bootstrap``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

PROVIDED = ("provided.al2023", "provided.al2")


class RuntimeJson(TypedDict, total=False):
    runtimes: list[str]
    command: list[str]
    requires: list[str]


class RuntimeNotFound(LookupError):
    """No runtime.json declares this runtime id, or a program it requires is missing."""


class InvalidEntrypoint(RuntimeError):
    """``provided.*``: ``{code}/bootstrap`` is missing or not executable (``Runtime.InvalidEntrypoint``)."""


@dataclass(frozen=True, slots=True)
class RuntimeSpec:
    runtime_id: str
    command: tuple[str, ...]  # with {dir}/{python} substituted, {code} still a placeholder
    requires: tuple[str, ...]


def runtimes_dir(environ: Mapping[str, str]) -> Path:
    configured = environ.get("LAMBDALET_RUNTIMES_DIR")
    if configured:
        return Path(configured).absolute()  # the bootstrap runs with the code directory as cwd
    return Path(__file__).resolve().parent.parent.parent


def discover(root: Path) -> dict[str, RuntimeSpec]:
    """Every runtime id declared under ``root``."""
    found: dict[str, RuntimeSpec] = {}
    for path in sorted(root.glob("*/runtime.json")):
        data: RuntimeJson = json.loads(path.read_text())
        command = tuple(
            part.replace("{dir}", str(path.parent)).replace("{python}", sys.executable)
            for part in data.get("command", [])
        )
        for runtime_id in data.get("runtimes", []):
            found[runtime_id] = RuntimeSpec(runtime_id, command, tuple(data.get("requires", [])))
    return found


def resolve(runtime_id: str, code_dir: str, environ: Mapping[str, str]) -> list[str]:
    """The command line that starts the bootstrap of ``runtime_id`` for code in ``code_dir``."""
    if runtime_id in PROVIDED:
        bootstrap = Path(code_dir) / "bootstrap"
        if not bootstrap.is_file() or not os.access(bootstrap, os.X_OK):
            raise InvalidEntrypoint(f"Couldn't find valid bootstrap(s): [{bootstrap}]")
        return [str(bootstrap)]
    root = runtimes_dir(environ)
    spec = discover(root).get(runtime_id)
    if spec is None:
        raise RuntimeNotFound(f"unknown runtime {runtime_id!r}: no {root}/*/runtime.json declares it")
    missing = [program for program in spec.requires if shutil.which(program) is None]
    if missing:
        raise RuntimeNotFound(f"runtime {runtime_id!r} needs {', '.join(missing)} on PATH")
    return [part.replace("{code}", code_dir) for part in spec.command]


def command_line(command: Sequence[str], code_dir: str) -> list[str]:
    """A ``-- COMMAND`` given on the command line, with ``{code}`` substituted."""
    return [part.replace("{code}", code_dir) for part in command]
